"""Celery workers: load candidate models, generate outputs, score them with mlflow.evaluate()."""
