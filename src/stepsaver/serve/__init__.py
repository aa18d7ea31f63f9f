"""Serve: the HTTP service (FastAPI + uvicorn, or Ray Serve replicas) and the preference study.

``create_app(settings)`` is the one door; ``stepsaver serve`` runs it.
"""

from stepsaver.serve.app import create_app
from stepsaver.serve.engine import BatchKey, GenerationEngine, QueueFull
from stepsaver.serve.settings import ServeSettings

__all__ = ["BatchKey", "GenerationEngine", "QueueFull", "ServeSettings", "create_app"]
