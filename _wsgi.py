"""The WSGI app: `gunicorn _wsgi:app` (gunicorn.conf.py sets the address, threads and checks),
or `python _wsgi.py` to try it on 127.0.0.1.

Only builds the app from the environment: the model class is in model.py, the protocol in
backend/app.py. Without BASIC_AUTH_USER/BASIC_AUTH_PASS the app logs that it is open (and
refuses to start when WAFER_REQUIRE_AUTH is true, as in the Docker image).
"""

from __future__ import annotations

import logging
import os

from backend.app import RequestLimits, create_app
from backend.settings import Settings
from model import WaferMapModel

logging.basicConfig(
    level=os.environ.get("LOG_LEVEL", "INFO"),
    format="%(asctime)s %(levelname)s %(name)s: %(message)s",
)
settings = Settings.from_env(os.environ)
app = create_app(
    WaferMapModel(settings),
    basic_auth=settings.basic_auth,
    require_auth=settings.require_auth,
    limits=RequestLimits(
        max_body_bytes=settings.max_request_bytes,
        max_tasks=settings.max_tasks,
        predict_requests=settings.predict_requests,
        predict_slots=min(2, settings.predict_requests),
    ),
)

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "9090")), threaded=True)
