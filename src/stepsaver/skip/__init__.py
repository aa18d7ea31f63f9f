"""Skip: AdaptiveDiffusion's third-order step skipping as a hook on any diffusers pipeline.

The door is ``enable_adaptive_skip(pipe, AdaptiveSkipConfig(...))`` and ``skip_report(pipe)``.
``config`` holds the settings (no torch needed), ``criterion`` the decision rule as pure functions
over latent-difference histories, ``hook`` attaches a decision policy to a pipeline's denoiser and
reports what ran, ``oracle`` finds by greedy search which steps could have been skipped and
measures how well the estimator agrees. Its benchmark is ``stepsaver.bench.skip``.

Names are imported on first use (PEP 562), so ``from stepsaver.skip import AdaptiveSkipConfig``
does not pay for torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "config": ["MIN_WARMUP", "AdaptiveSkipConfig"],
    "criterion": ["consecutive_skips", "is_flat", "latent_difference", "next_step_skipped",
                  "next_step_skipped_batched", "official_next_step_skipped", "skip_path"],
    "hook": ["AdaptiveSkipHook", "CriterionPolicy", "SkipPolicy", "SkipReport", "disable_adaptive_skip",
             "enable_adaptive_skip", "skip_enabled", "skip_report"],
    "oracle": ["ForcedSkipPolicy", "OracleResult", "forced_skips", "greedy_oracle", "path_agreement",
               "position_agreement", "relative_l2", "run_skip_path", "skip_position_chi2"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
