"""stepsaver: spend only the denoising steps each prompt needs.

The front doors: :func:`load_pipeline` (the embedded model, a hub id or a folder, as a regular
diffusers pipeline), :func:`generate` / :func:`generate_images` (images with their denoiser calls
and seconds) and Skip's :func:`enable_adaptive_skip`, :class:`AdaptiveSkipConfig` and
:func:`skip_report`. Predict, Skip, Shrink, Measure and Serve live in the sub-packages of the same
names; benchmarks in ``stepsaver.bench``.

Names are imported on first use (PEP 562): ``stepsaver --help`` must not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_WHERE = {
    "StepsaverError": "stepsaver.errors",
    "GenerationResult": "stepsaver.generation",
    "generate": "stepsaver.generation",
    "generate_images": "stepsaver.generation",
    "SCHEDULERS": "stepsaver.pipelines",
    "load_pipeline": "stepsaver.pipelines",
    "make_scheduler": "stepsaver.pipelines",
    "AdaptiveSkipConfig": "stepsaver.skip",
    "enable_adaptive_skip": "stepsaver.skip",
    "disable_adaptive_skip": "stepsaver.skip",
    "skip_report": "stepsaver.skip",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return [*__all__, "__version__"]
