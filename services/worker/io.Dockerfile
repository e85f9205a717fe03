# The I/O workers (services/worker/io_app.py): requests to remote model endpoints and webhook
# deliveries, many at once in threads. They never import torch, transformers or mlflow, so the
# image installs the `io` extra alone: a fraction of the model workers' image.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# README.m[d]: setuptools only warns when the readme is missing, so the build need not fail on it.
COPY pyproject.toml README.m[d] ./
COPY shared ./shared
COPY services ./services

RUN pip install --no-cache-dir ".[io]"

RUN useradd --create-home --uid 10001 app
USER app

CMD ["celery", "-A", "services.worker.io_app", "worker", "--loglevel", "INFO", "--pool", "threads", \
     "--concurrency", "8", "--queues", "llm-compare.io", "--without-gossip", "--without-mingle"]
