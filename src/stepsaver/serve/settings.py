"""Service settings: one object, from arguments, environment variables or a JSON config file."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, Field

from stepsaver.errors import StepsaverError


class ServeSettings(BaseModel):
    """Everything the service can be told; each field has a ``STEPSAVER_<NAME>`` variable."""

    model: str = "tiny"
    recommender: str = "tiny"
    token: str | None = Field(default=None, repr=False)
    insecure: bool = False  # allow /v1/generate without a token (refused otherwise)
    recommend_requires_token: bool = False
    max_prompt_chars: int = 2000
    max_recommend_batch: int = 256
    queue_size: int = 32  # generate jobs waiting; one more is a 503
    workers: int = 1  # generation threads, one pipeline each
    batch_size: int = 8  # compatible generate requests run as one pipeline call
    batch_wait_ms: float = 20.0
    request_timeout_s: float = 120.0
    max_steps: int = 200
    study_db: str = "runs/study.sqlite"
    study_dir: str = "runs/studies"

    @classmethod
    def load(cls, config: str | Path | None = None, **overrides: object) -> ServeSettings:
        """Config file (JSON) < environment (``STEPSAVER_*``) < explicit overrides (not None)."""
        data: dict[str, object] = {}
        if config is not None:
            path = Path(config)
            if not path.exists():
                raise StepsaverError(f"config file {path} does not exist")
            try:
                data.update(json.loads(path.read_text()))
            except json.JSONDecodeError as exc:
                raise StepsaverError(f"config file {path} is not valid JSON (line {exc.lineno})") from None
        for name in cls.model_fields:
            value = os.environ.get(f"STEPSAVER_{name.upper()}")
            if value is not None:
                data[name] = value
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            settings = cls(**data)
        except ValueError as exc:
            raise StepsaverError(f"bad service setting: {str(exc).splitlines()[0:3]}") from None
        if settings.workers < 1 or settings.batch_size < 1 or settings.queue_size < 1:
            raise StepsaverError("workers, batch_size and queue_size must be >= 1")
        return settings
