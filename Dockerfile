# syntax=docker/dockerfile:1
# Wafer-map ML backend for Label Studio 1.23.2: the HTTP backend (gunicorn) and the rq worker
# run from this one image (see docker-compose.yml and docs/docker.md).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Non-root user; /models and /cache are created here so that named volumes mounted there start
# out owned by this user.
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin wafer \
 && mkdir -p /models /cache \
 && chown wafer:wafer /models /cache

WORKDIR /app

# Dependencies first, in their own layer: code edits do not reinstall them.
# requirements.txt pins only what the served system runs on (torch, torchvision, numpy, pandas,
# pillow, tqdm, Flask, gunicorn, httpx, rq, redis, label-studio-sdk); Label Studio itself, the
# study's and the tooling's packages and the test tools are in requirements-dev.txt, which the image
# does not install. Same steps as scripts/install: a venv, pip upgraded, `pip install -r`, then
# `pip check`, from the ordinary registry (no extra index: torch 2.14.0 / torchvision 0.29.2 from
# PyPI run on CPU-only hosts and on NVIDIA GPUs alike; they make the image large, about 6 GB).
COPY requirements.txt .
# hadolint ignore=DL3013
RUN python -m venv "$VIRTUAL_ENV" \
 && pip install --upgrade pip \
 && pip install --progress-bar off -r requirements.txt \
 && pip check

# Only what the backend, the worker and the ops CLI run: the top-level files, the core modules
# backend/*.py and backend/sources/. The offline study (backend/study/) and the local tooling
# (backend/harness/) are not copied; the core never imports them (tests/test_packaging.py checks
# that every module the served system imports is copied, and nothing of those two).
COPY label_config.xml model.py _wsgi.py gunicorn.conf.py ./
COPY backend/*.py backend/
COPY backend/sources/ backend/sources/

USER 10001:10001
# The backend listens on all of the container's addresses, so it refuses to start without
# BASIC_AUTH_USER / BASIC_AUTH_PASS (gunicorn.conf.py and the app both check).
ENV MODEL_DIR=/models \
    WAFER_CACHE_DIR=/cache \
    WAFER_REQUIRE_AUTH=true

EXPOSE 9090
# Threads, workers and timeout: gunicorn.conf.py (24 threads, at most 20 for /predict).
CMD ["gunicorn", "--bind", "0.0.0.0:9090", "_wsgi:app"]
