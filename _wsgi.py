"""The WSGI app: `gunicorn _wsgi:app` (gunicorn.conf.py sets the address, the worker, threads
and checks), or `python _wsgi.py` to try it on 127.0.0.1.

Only builds the app from the environment: the model class is in model.py, the protocol in
backend/app.py, the server's worker in backend/http_worker.py. Without
BASIC_AUTH_USER/BASIC_AUTH_PASS the app logs that it is open (and refuses to start when
WAFER_REQUIRE_AUTH is true, as in the Docker image).
"""

from __future__ import annotations

import logging
import os

from prometheus_client import CollectorRegistry

from backend.allocator import keep_freed_memory
from backend.app import RequestLimits, create_app
from backend.loop_keys import QUEUES
from backend.monitoring import LoopCollector
from backend.settings import Settings
from backend.webhook_auth import webhook_token
from model import WaferMapModel

logging.basicConfig(
    level=os.environ.get("LOG_LEVEL", "INFO"),
    format="%(asctime)s %(levelname)s %(name)s: %(message)s",
)
settings = Settings.from_env(os.environ)
if settings.keep_freed_memory:
    keep_freed_memory()
model = WaferMapModel(settings)
# /metrics: the app's own traffic, and the loop's state read from MODEL_DIR and rq when scraped.
registry = CollectorRegistry()
registry.register(
    LoopCollector(settings.model_dir, model.service.served_card, model.service.redis, QUEUES)
)
app = create_app(
    model,
    basic_auth=settings.basic_auth,
    require_auth=settings.require_auth,
    webhook_token=webhook_token(settings.basic_auth, settings.webhook_secret),
    limits=RequestLimits(
        max_body_bytes=settings.max_request_bytes,
        max_tasks=settings.max_tasks,
        predict_requests=settings.predict_requests,
        predict_slots=min(2, settings.predict_requests),
        memory_bytes=settings.request_memory_bytes,
    ),
    registry=registry,
)

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "9090")), threaded=True)
