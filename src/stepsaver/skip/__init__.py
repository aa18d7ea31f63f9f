"""Skip: AdaptiveDiffusion's third-order step skipping as a hook on any diffusers pipeline.

``criterion`` holds the decision rule as pure functions over latent-difference histories;
``hook`` attaches it to a pipeline's denoiser (``enable_adaptive_skip``) and reports what it did.
"""

from stepsaver.skip.criterion import (
    consecutive_skips,
    is_flat,
    latent_difference,
    next_step_skipped,
    next_step_skipped_batched,
    official_next_step_skipped,
    skip_path,
)
from stepsaver.skip.hook import (
    AdaptiveSkipConfig,
    AdaptiveSkipHook,
    SkipReport,
    disable_adaptive_skip,
    enable_adaptive_skip,
    skip_report,
)

__all__ = [
    "AdaptiveSkipConfig",
    "AdaptiveSkipHook",
    "SkipReport",
    "consecutive_skips",
    "disable_adaptive_skip",
    "enable_adaptive_skip",
    "is_flat",
    "latent_difference",
    "next_step_skipped",
    "next_step_skipped_batched",
    "official_next_step_skipped",
    "skip_path",
    "skip_report",
]
