"""The one code path that calls a pipeline to make images, batch first, with each image's cost.

Every caller in stepsaver (the CLI, the service, labelling, benchmarks, sample grids) makes
images through :func:`generate_images`, so seeding, timing and call counting are done once and
the same way: per-prompt generators (a batch of N prompts draws the same noise as N single
calls), one timed pipeline call per chunk, denoiser calls counted by the core
(:mod:`stepsaver.calls`) and, where a hook saved calls (Skip), read back per image from the report
it published. It works for UNet and transformer denoisers alike.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from stepsaver.calls import count_denoiser_calls, take_call_report
from stepsaver.errors import StepsaverError

__all__ = ["MAX_SEED", "MAX_STEPS", "GenerationResult", "generate", "generate_images", "validate_request",
           "validate_seed"]

MAX_STEPS = 1000

StepChooser = Callable[[str], "int | tuple[int, dict[str, Any]]"]
"""Steps per prompt, chosen by the caller (e.g. :func:`stepsaver.predict.step_chooser`, the recommender):
a step count, or a step count and what to add to the result's summary."""


@dataclass
class GenerationResult:
    """One prompt's image(s) and what they cost.

    ``seconds`` is the wall-clock of the pipeline call that made the image (shared by the images
    of one batch: ``batch_size`` says how many); ``denoiser_calls`` the network runs this image's
    trajectory made; ``path`` the per-step skip flags when a call-saving hook ran.
    """

    images: list[Any]
    prompt: str
    steps: int
    denoiser_calls: int
    seconds: float
    seed: int | None
    guidance: float
    scheduler: str
    extra: dict = field(default_factory=dict)
    path: list[bool] | None = None
    batch_size: int = 1

    @property
    def image(self) -> Any:
        return self.images[0]

    def summary(self) -> dict:
        return {"prompt": self.prompt, "steps": self.steps, "denoiser_calls": self.denoiser_calls,
                "seconds": round(self.seconds, 4), "seed": self.seed, "guidance": self.guidance,
                "scheduler": self.scheduler, **self.extra}


def validate_request(prompt: str, steps: int, guidance: float, guidance_rescale: float = 0.0) -> None:
    """Reject what a user can get wrong before any model work starts (one-line errors)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise StepsaverError("prompt is empty; pass the text to draw, e.g. 'a cat on a blue background'")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise StepsaverError(f"prompt is not valid Unicode text (character {exc.start} is a lone surrogate "
                             f"{prompt[exc.start]!r}); remove it or re-encode the text") from None
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0 or steps > MAX_STEPS:
        raise StepsaverError(f"steps must be an integer in 1..{MAX_STEPS}, got {steps}")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
            or guidance < 0:
        raise StepsaverError(f"guidance must be a finite number >= 0 (0 or 1 disables CFG), got {guidance}")
    if not 0.0 <= guidance_rescale <= 1.0:  # also refuses nan
        raise StepsaverError(f"guidance rescale must be in [0, 1], got {guidance_rescale}")


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer


def validate_seed(seed: int | None) -> None:
    """A seed is an integer in 0..2^63-1 (or None: draw one)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise StepsaverError(f"seed must be an integer in 0..{MAX_SEED}, got {seed!r}")


def _seeds(seeds: int | Sequence[int | None] | None, n: int) -> list[int]:
    """One seed per prompt; ``None`` draws a fresh one (reported, so the image can be remade)."""
    if seeds is None or isinstance(seeds, int):
        seeds = [seeds] * n
    seeds = list(seeds)
    for s in seeds:
        validate_seed(s)
    if len(seeds) != n:
        raise StepsaverError(f"got {len(seeds)} seeds for {n} prompts; pass one seed per prompt or a single seed")
    return [torch.Generator("cpu").seed() % 2**63 if s is None else int(s) for s in seeds]


def _chosen(steps: StepChooser, prompts: list[str]) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for prompt in prompts:
        validate_request(prompt, 1, 0.0)
        choice = steps(prompt)
        out.append(choice if isinstance(choice, tuple) else (choice, {}))
    return out


def generate_images(pipe: Any, prompts: Sequence[str], steps: int | StepChooser = 30,
                    seeds: int | Sequence[int | None] | None = 0, guidance: float = 5.0,
                    guidance_rescale: float = 0.0, batch_size: int | None = None,
                    **call_kwargs: Any) -> list[GenerationResult]:
    """Run ``pipe`` on ``prompts`` (``batch_size`` per pipeline call; all at once by default).

    Returns one :class:`GenerationResult` per prompt, in order. ``seeds`` is one seed per prompt
    or a single seed used for every prompt (the noise ``generate(pipe, p, seed=s)`` starts from).
    Extra keyword arguments go to the pipeline (``height``, ``output_type``, ``negative_prompt``...).
    ``steps`` may be a :data:`StepChooser` (a step count per prompt, e.g. the recommender's):
    prompts that got the same count are batched together.
    """
    if isinstance(prompts, str):
        raise StepsaverError("generate_images takes a list of prompts; use generate() for one prompt")
    prompts = list(prompts)
    if isinstance(steps, str):
        raise StepsaverError(f"steps must be an integer, got {steps!r}; for 'auto' pass "
                             "steps=stepsaver.predict.step_chooser() (the recommender)")
    if callable(steps):
        chosen = _chosen(steps, prompts)
        seed_list = _seeds(seeds, len(prompts))
        results: list[GenerationResult | None] = [None] * len(prompts)
        for n in sorted({c[0] for c in chosen}):
            idx = [i for i, c in enumerate(chosen) if c[0] == n]
            group = generate_images(pipe, [prompts[i] for i in idx], n, [seed_list[i] for i in idx], guidance,
                                    guidance_rescale, batch_size, **call_kwargs)
            for i, r in zip(idx, group, strict=True):
                r.extra.update(chosen[i][1])
                results[i] = r
        return [r for r in results if r is not None]
    for prompt in prompts:
        validate_request(prompt, steps, guidance, guidance_rescale)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise StepsaverError(f"batch size must be an integer >= 1, got {batch_size!r}")
    seed_list = _seeds(seeds, len(prompts))
    accepted = inspect.signature(pipe.__call__).parameters
    kwargs: dict[str, Any] = {"num_inference_steps": steps, "guidance_scale": guidance, **call_kwargs}
    if guidance_rescale and "guidance_rescale" in accepted:
        kwargs["guidance_rescale"] = guidance_rescale
    device = getattr(pipe, "device", torch.device("cpu"))
    size = batch_size or max(1, len(prompts))
    results: list[GenerationResult] = []
    for start in range(0, len(prompts), size):
        chunk, chunk_seeds = prompts[start:start + size], seed_list[start:start + size]
        generators = [torch.Generator("cpu").manual_seed(s) for s in chunk_seeds]
        take_call_report(pipe)  # a report left by an earlier call is not this call's
        with count_denoiser_calls(pipe) as calls, torch.inference_mode():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = pipe(chunk, generator=generators, **_true_cfg(pipe, accepted, guidance, len(chunk), kwargs))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
        report = take_call_report(pipe)
        per_prompt = len(out.images) // len(chunk)
        for i, (prompt, seed) in enumerate(zip(chunk, chunk_seeds, strict=True)):
            made, extra, path = calls[0], {}, None
            if report is not None:
                made = report.calls_of(i)
                path = report.path(i)
                extra = {"denoiser_calls_saved": report.saved_of(i), "skipped_steps": report.skipped_steps(i)}
            results.append(GenerationResult(
                images=list(out.images[i * per_prompt:(i + 1) * per_prompt]), prompt=prompt, steps=steps,
                denoiser_calls=made, seconds=seconds, seed=seed, guidance=guidance,
                scheduler=type(pipe.scheduler).__name__, extra=extra, path=path, batch_size=len(chunk)))
    return results


def _true_cfg(pipe: Any, accepted: Any, guidance: float, n: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with ``guidance`` spent as true CFG on pipelines whose model has no guidance embedding.

    Why: FluxPipeline (and its kin) read ``guidance_scale`` only as the input of a guidance-
    distilled model's embedding; a model without one (our tiny-flux, Flux-schnell-style models)
    needs ``true_cfg_scale`` and a negative prompt for classifier-free guidance, which diffusers
    then runs as a second transformer call per step. An explicit ``negative_prompt`` or
    ``true_cfg_scale`` of the caller wins.
    """
    config = getattr(getattr(pipe, "transformer", None), "config", None)
    if "true_cfg_scale" not in accepted or config is None or getattr(config, "guidance_embeds", True) \
            or guidance <= 1 or "true_cfg_scale" in kwargs:
        return kwargs
    return {"negative_prompt": [""] * n, **kwargs, "true_cfg_scale": guidance}


def generate(pipe: Any, prompt: str, steps: int | StepChooser = 30, seed: int | None = 0, guidance: float = 5.0,
             guidance_rescale: float = 0.0, **call_kwargs: Any) -> GenerationResult:
    """One prompt through :func:`generate_images`: its images with steps, denoiser calls and seconds.

    ``steps=stepsaver.predict.step_chooser()`` lets the step recommender choose.
    """
    return generate_images(pipe, [prompt], steps=steps, seeds=seed, guidance=guidance,
                           guidance_rescale=guidance_rescale, **call_kwargs)[0]
