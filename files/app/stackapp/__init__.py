"""The reference application: a FastAPI API that hands work to Celery workers."""
