"""Counting denoiser calls: the currency of the whole project, measured by the core.

Predict saves steps, Skip saves calls within steps, and every benchmark prices a method by the
calls it made, so the count is measured, not inferred: a forward pre-hook on the pipeline's
denoiser (``unet`` or ``transformer``) counts every call the pipeline makes, which makes
second-order samplers (Heun, DPM2: two calls a step) and CFG-free pipelines come out right
without special cases.

A hook that answers some of those calls without running the network (Skip's cache) knows more
than the counter can see. It publishes a :class:`CallReport` on the pipeline
(:func:`publish_call_report`) and the core reads it back per image (:func:`take_call_report`);
that is the one way the core learns about savings, so it never imports a verb.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch

from stepsaver.errors import StepsaverError

__all__ = ["CallReport", "count_denoiser_calls", "denoiser_of", "publish_call_report", "take_call_report"]

_REPORT_ATTR = "_stepsaver_call_report"


def denoiser_of(pipe: Any, purpose: str = "count calls on") -> torch.nn.Module:
    """The pipeline's denoising network: ``unet`` for UNet pipelines, ``transformer`` for DiTs."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise StepsaverError(f"{type(pipe).__name__} has no `unet` or `transformer` denoiser to {purpose}")


@contextlib.contextmanager
def count_denoiser_calls(pipe: Any) -> Iterator[list[int]]:
    """Context manager yielding a one-element list that holds the number of denoiser calls."""
    counter = [0]

    def hook(_module, _args):
        counter[0] += 1

    handle = denoiser_of(pipe).register_forward_pre_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()


@runtime_checkable
class CallReport(Protocol):
    """What a call-saving hook tells the core about one pipeline call, per sample of its batch."""

    def calls_of(self, sample: int) -> int:
        """Denoiser calls that really ran for ``sample`` (its rows were computed)."""
        ...

    def saved_of(self, sample: int) -> int:
        """Calls of the pipeline that ``sample`` was answered from a cache instead."""
        ...

    def skipped_steps(self, sample: int = 0) -> list[int]:
        """Scheduler steps at which ``sample`` reused an earlier output."""
        ...

    def path(self, sample: int = 0) -> list[bool]:
        """Per scheduler step: ``True`` where ``sample`` reused an earlier output."""
        ...


def publish_call_report(pipe: Any, report: CallReport | None) -> None:
    """Called by a hook (during or after a pipeline call) to say what it saved in that call."""
    pipe.__dict__[_REPORT_ATTR] = report


def take_call_report(pipe: Any) -> CallReport | None:
    """The report published since the last take (and forget it, so it is never read twice)."""
    return pipe.__dict__.pop(_REPORT_ATTR, None)
