"""The WSGI app: `gunicorn --bind 127.0.0.1:9090 _wsgi:app` (or `python _wsgi.py` to try it).

Only builds the app from the environment: the model class is in model.py, the protocol in
backend/app.py.
"""

from __future__ import annotations

import logging
import os

from backend.app import create_app
from backend.settings import Settings
from model import WaferMapModel

logging.basicConfig(
    level=os.environ.get("LOG_LEVEL", "INFO"),
    format="%(asctime)s %(levelname)s %(name)s: %(message)s",
)
settings = Settings.from_env(os.environ)
app = create_app(WaferMapModel(settings), basic_auth=settings.basic_auth)

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "9090")))
