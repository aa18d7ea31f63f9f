"""Service settings: one object, from arguments, environment variables or a JSON config file."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stepsaver.errors import StepsaverError
from stepsaver.files import read_json

MIN_TOKEN_CHARS = 16


class ServeSettings(BaseModel):
    """Everything the service can be told; each field has a ``STEPSAVER_<NAME>`` variable.

    A blank ``token`` ("" or whitespace) counts as no token at all, so it is refused exactly like
    a missing one (unless ``insecure``); a set token must be at least :data:`MIN_TOKEN_CHARS`
    visible ASCII characters (what a client can send in an ``Authorization`` header).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = "tiny"
    recommender: str = "tiny"
    token: str | None = Field(default=None, repr=False)
    insecure: bool = False  # allow /v1/generate without a token (refused otherwise)
    recommend_requires_token: bool = False
    max_prompt_chars: int = Field(2000, ge=1)
    max_recommend_batch: int = Field(256, ge=1)
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024)  # a larger request body is a 413, never read
    queue_size: int = Field(32, ge=1)  # generate jobs waiting (not yet running); one more is a 503
    workers: int = Field(1, ge=1)  # generation threads, one pipeline each
    batch_size: int = Field(8, ge=1)  # compatible generate requests run as one pipeline call
    batch_wait_ms: float = Field(20.0, ge=0)
    request_timeout_s: float = Field(120.0, gt=0)
    max_steps: int = Field(200, ge=1)
    calibration: str | None = None  # a config file from `stepsaver calibrate`: the default of every request
    study_db: str = "runs/study.sqlite"
    study_dir: str = "runs/studies"

    @field_validator("token")
    @classmethod
    def _usable_token(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None  # blank is missing: refused at start-up unless --insecure
        if len(v) < MIN_TOKEN_CHARS:
            raise ValueError(f"the token has {len(v)} characters; use at least {MIN_TOKEN_CHARS} "
                             "(e.g. `openssl rand -hex 16`)")
        if not all("!" <= ch <= "~" for ch in v):
            raise ValueError("the token must be visible ASCII characters only (no spaces, no control or "
                             "non-ASCII characters), e.g. `openssl rand -hex 16`")
        return v

    @classmethod
    def load(cls, config: str | Path | None = None, **overrides: object) -> ServeSettings:
        """Config file (JSON) < environment (``STEPSAVER_*``) < explicit overrides (not None).

        The file may also be a calibrated config written by ``stepsaver calibrate``: the service
        then serves its model, and a request that leaves out steps, scheduler, Skip or guidance
        gets the calibrated value.
        """
        data: dict[str, object] = {}
        if config is not None:
            path = Path(config)
            loaded = read_json(path, "config")
            if not isinstance(loaded, dict):
                raise StepsaverError(f"config file {path} must hold a JSON object of settings")
            from stepsaver.calibrate.config import is_calibrated_config

            if is_calibrated_config(loaded):  # `serve --config CALIBRATED.json`: its model, calibrated defaults
                loaded = {"model": loaded.get("model", "tiny"), "calibration": str(path),
                          **({"recommender": loaded["recommender"]} if loaded.get("recommender") else {})}
            data.update(loaded)
        for name in cls.model_fields:
            value = os.environ.get(f"STEPSAVER_{name.upper()}")
            if value is not None:
                data[name] = value
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            settings = cls(**data)
        except ValidationError as exc:
            raise StepsaverError(f"bad service setting: {describe(exc)}") from None
        return settings


def describe(exc: ValidationError) -> str:
    """One line naming each bad setting, never echoing its value (the token is a secret)."""
    parts = []
    for e in exc.errors(include_input=False, include_url=False):
        name = ".".join(str(p) for p in e["loc"]) or "settings"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown setting; known: {', '.join(ServeSettings.model_fields)}"
        where = f" (STEPSAVER_{name.upper()})" if name in ServeSettings.model_fields else ""
        parts.append(f"{name}{where}: {msg}")
    return "; ".join(parts)
