"""Celery worker that runs d4c_core pipelines for queued jobs."""
