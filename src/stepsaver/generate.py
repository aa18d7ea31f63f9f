"""One text-to-image generation with its cost: denoiser calls and seconds.

The call count is the currency of the whole project (Predict saves steps, Skip saves calls
within steps), so it is measured, not inferred: a forward pre-hook on the pipeline's denoiser
(``unet`` or ``transformer``) counts every call, which makes second-order samplers (Heun, DPM2:
two calls a step) and CFG-free pipelines come out right without special cases.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from stepsaver.errors import StepsaverError

MAX_STEPS = 1000


@dataclass
class GenerationResult:
    images: list[Any]
    prompt: str
    steps: int
    denoiser_calls: int
    seconds: float
    seed: int | None
    guidance: float
    scheduler: str
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"prompt": self.prompt, "steps": self.steps, "denoiser_calls": self.denoiser_calls,
                "seconds": round(self.seconds, 4), "seed": self.seed, "guidance": self.guidance,
                "scheduler": self.scheduler, **self.extra}


def denoiser_of(pipe, purpose: str = "count calls on") -> torch.nn.Module:
    """The pipeline's denoising network: ``unet`` for UNet pipelines, ``transformer`` for DiTs."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise StepsaverError(f"{type(pipe).__name__} has no `unet` or `transformer` denoiser to {purpose}")


@contextlib.contextmanager
def count_denoiser_calls(pipe) -> Iterator[list[int]]:
    """Context manager yielding a one-element list that holds the number of denoiser calls."""
    counter = [0]

    def hook(_module, _args):
        counter[0] += 1

    handle = denoiser_of(pipe).register_forward_pre_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()


def validate_request(prompt: str, steps: int, guidance: float) -> None:
    """Reject what a user can get wrong before any model work starts (one-line errors)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise StepsaverError("prompt is empty; pass the text to draw, e.g. 'a cat on a blue background'")
    if not isinstance(steps, int) or steps <= 0 or steps > MAX_STEPS:
        raise StepsaverError(f"steps must be an integer in 1..{MAX_STEPS}, got {steps}")
    if guidance < 0:
        raise StepsaverError(f"guidance must be >= 0 (0 or 1 disables CFG), got {guidance}")


def resolve_steps(prompt: str, steps: int | str, recommender: Any = None,
                  confidence: float | None = None) -> tuple[int, dict[str, Any]]:
    """``steps`` as given, or ``"auto"``: ask the step recommender (Predict) for this prompt."""
    if steps != "auto":
        if isinstance(steps, str):
            try:
                steps = int(steps)
            except ValueError:
                raise StepsaverError(f"steps must be an integer or 'auto', got {steps!r}") from None
        return steps, {}
    validate_request(prompt, 1, 0.0)
    from stepsaver.predict.recommender import StepRecommender

    rec = recommender if recommender is not None else StepRecommender.load("tiny")
    if isinstance(rec, str):
        rec = StepRecommender.load(rec)
    r = rec.recommend(prompt, confidence=confidence)
    return r.steps, {"steps_source": "recommended", "recommend_ms": round(r.milliseconds, 3),
                     "confidence": confidence, "steps_saved_vs_50": 50 - r.steps}


def generate(pipe, prompt: str, steps: int | str = 30, seed: int | None = 0, guidance: float = 5.0,
             guidance_rescale: float = 0.0, recommender: Any = None, confidence: float | None = None,
             **call_kwargs: Any) -> GenerationResult:
    """Run ``pipe`` on one prompt and return the images with steps, denoiser calls and seconds.

    ``steps="auto"`` lets the step recommender choose (``recommender``: a
    :class:`~stepsaver.predict.StepRecommender`, a saved folder, or None for the shipped one;
    ``confidence`` as in :meth:`StepRecommender.recommend`).
    """
    steps, auto = resolve_steps(prompt, steps, recommender, confidence)
    validate_request(prompt, steps, guidance)
    if not 0.0 <= guidance_rescale <= 1.0:
        raise StepsaverError(f"guidance rescale must be in [0, 1], got {guidance_rescale}")
    accepted = inspect.signature(pipe.__call__).parameters
    kwargs: dict[str, Any] = {"num_inference_steps": steps, "guidance_scale": guidance, **call_kwargs}
    if guidance_rescale and "guidance_rescale" in accepted:
        kwargs["guidance_rescale"] = guidance_rescale
    if seed is not None:
        kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
    device = getattr(pipe, "device", torch.device("cpu"))
    with count_denoiser_calls(pipe) as calls, torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = pipe(prompt, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    made, extra = calls[0], dict(auto)
    from stepsaver.skip import skip_enabled, skip_report

    # the Skip hook answers some calls from its cache: count real runs; a report kept after
    # disable_adaptive_skip belongs to an earlier call, not to this one
    report = skip_report(pipe) if skip_enabled(pipe) else None
    if report is not None:
        made = report.denoiser_calls
        extra.update(denoiser_calls_saved=report.calls_saved, skipped_steps=report.skipped_steps(0))
    return GenerationResult(images=list(out.images), prompt=prompt, steps=steps, denoiser_calls=made,
                            seconds=seconds, seed=seed, guidance=guidance,
                            scheduler=type(pipe.scheduler).__name__, extra=extra)
