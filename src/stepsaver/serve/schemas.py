"""Request and response bodies of the HTTP API (pydantic: a bad field is a 422 that names it)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from stepsaver.pipelines import SCHEDULERS
from stepsaver.skip.config import AdaptiveSkipConfig


class RecommendRequest(BaseModel):
    prompt: str | list[str] = Field(..., description="One prompt or a list of prompts.")
    confidence: float | None = Field(None, gt=0, le=1, description="Fewest steps s with P(label <= s) >= this.")


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
    threshold: float = Field(AdaptiveSkipConfig.threshold, ge=0, description="AdaptiveDiffusion delta.")
    max_skips: int = Field(AdaptiveSkipConfig.max_skips, ge=0, le=50, description="Most consecutive skips (C_max).")


class GenerateRequest(BaseModel):
    prompt: str = Field(..., min_length=1)
    steps: int | Literal["auto"] = Field(30, description="1..max_steps, or 'auto' (the recommender).")
    skip: bool | SkipOptions = Field(False, description="AdaptiveDiffusion skipping: true, false or its settings.")
    scheduler: str = Field("ddim", description="A name from `stepsaver schedulers`.")
    seed: int = Field(0, ge=0, lt=2**63)
    guidance: float = Field(5.0, ge=0, le=50)
    confidence: float | None = Field(None, gt=0, le=1, description="With steps='auto'.")
    format: Literal["png", "json"] = "png"

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, v: str) -> str:
        if v not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {v!r}; allowed: {', '.join(SCHEDULERS)}")
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
