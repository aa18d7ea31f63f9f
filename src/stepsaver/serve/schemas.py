"""Request and response bodies of the HTTP API (pydantic: a bad field is a 422 that names it).

Request bodies are strict: a field takes only its own JSON type (``"steps": "2"``, ``true`` for a
number, ``"skip": "yes"`` are 422s; an integer is fine where a number goes), an unknown field is a
422 naming it, and no number may be NaN or infinite. Prompts must be valid Unicode (a lone
surrogate such as ``"\\ud800"`` is a 422, not a tokenizer crash).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from stepsaver.calibrate.space import OWN
from stepsaver.pipelines import SCHEDULERS
from stepsaver.skip.config import DEFAULT_RULE

STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


def lone_surrogate(text: str) -> str | None:
    """Where ``text`` cannot be encoded as UTF-8 (a lone surrogate): a phrase naming it, else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains a lone surrogate (U+{ord(text[exc.start]):04X}) at character {exc.start}; send valid Unicode"
    return None


def _check_unicode(value: Any) -> Any:
    for i, item in enumerate([value] if isinstance(value, str) else value if isinstance(value, list) else []):
        problem = lone_surrogate(item) if isinstance(item, str) else None
        if problem:
            raise ValueError(f"prompt {i} {problem}" if isinstance(value, list) else f"prompt {problem}")
    return value


class RecommendRequest(BaseModel):
    model_config = STRICT

    prompt: str | list[str] = Field(..., description="One prompt or a list of prompts.")
    confidence: float | None = Field(None, gt=0, le=1, description="Fewest steps s with P(label <= s) >= this.")

    @field_validator("prompt", mode="before")
    @classmethod
    def _valid_unicode(cls, v: Any) -> Any:
        return _check_unicode(v)


class RecommendItem(BaseModel):
    prompt: str
    steps: int
    probabilities: dict[str, float]
    english: bool
    note: str = ""


class RecommendResponse(BaseModel):
    recommendations: list[RecommendItem]
    milliseconds: float


class SkipOptions(BaseModel):
    model_config = STRICT

    threshold: float | None = Field(None, ge=0, description="What the rule compares against: for drift (default) "
                                    "the relative reuse error, e.g. 0.1; for the criterion its delta, e.g. 0.02. "
                                    "Left out: the rule's default.")
    max_skips: int | None = Field(None, ge=0, le=50, description="Most consecutive skips (C_max); left out: the "
                                                                 "rule's default (drift 6, criterion 4).")
    rule: Literal["criterion", "drift", "fixed"] = Field(
        DEFAULT_RULE, description="What decides a skip: the measured reuse error (drift), the paper's third-order "
                                  "criterion, or a fixed interval of max_skips + 1 steps.")


class GenerateRequest(BaseModel):
    model_config = STRICT

    prompt: str = Field(..., min_length=1)
    steps: int | Literal["auto"] = Field(30, description="1..max_steps, or 'auto' (the recommender).")
    skip: bool | SkipOptions = Field(False, description="AdaptiveDiffusion skipping: true, false or its settings.")
    scheduler: str = Field(OWN, description="A name from `stepsaver schedulers`, or 'own' (the model's own: "
                                            "DDIM for tiny, flow-matching Euler for tiny-flux).")
    seed: int = Field(0, ge=0, lt=2**63)
    guidance: float = Field(5.0, ge=0, le=50)
    confidence: float | None = Field(None, gt=0, le=1, description="With steps='auto'.")
    format: Literal["png", "json"] = "png"

    @field_validator("prompt", mode="before")
    @classmethod
    def _valid_unicode(cls, v: Any) -> Any:
        return _check_unicode(v)

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, v: str) -> str:
        if v not in SCHEDULERS and v != OWN:
            raise ValueError(f"unknown scheduler {v!r}; allowed: {OWN}, {', '.join(SCHEDULERS)}")
        return v

    @field_validator("steps")
    @classmethod
    def _positive_steps(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("steps must be >= 1 or 'auto'")
        return v


class GenerateResponse(BaseModel):
    image_base64: str
    steps: int
    steps_source: Literal["given", "recommended"]
    denoiser_calls: int
    denoiser_calls_saved: int
    seconds: float
    queue_seconds: float
    batch_size: int
    seed: int
    scheduler: str
