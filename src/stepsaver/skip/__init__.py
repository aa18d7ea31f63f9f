"""Skip: AdaptiveDiffusion's third-order step skipping as a hook on any diffusers pipeline.

``criterion`` holds the decision rule as pure functions over latent-difference histories;
``hook`` attaches it to a pipeline's denoiser (``enable_adaptive_skip``) and reports what it did;
``oracle`` finds by greedy search which steps could have been skipped and measures how well the
estimator agrees; ``bench`` is ``stepsaver bench skip`` (imported on demand, it pulls plotting).
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
    skip_enabled,
    skip_report,
)
from stepsaver.skip.oracle import (
    ForcedSkipHook,
    OracleResult,
    forced_skips,
    greedy_oracle,
    path_agreement,
    position_agreement,
    relative_l2,
    run_skip_path,
    skip_position_chi2,
)

__all__ = [
    "AdaptiveSkipConfig",
    "AdaptiveSkipHook",
    "ForcedSkipHook",
    "OracleResult",
    "SkipReport",
    "consecutive_skips",
    "disable_adaptive_skip",
    "enable_adaptive_skip",
    "forced_skips",
    "greedy_oracle",
    "is_flat",
    "latent_difference",
    "next_step_skipped",
    "next_step_skipped_batched",
    "official_next_step_skipped",
    "path_agreement",
    "position_agreement",
    "relative_l2",
    "run_skip_path",
    "skip_path",
    "skip_position_chi2",
    "skip_enabled",
    "skip_report",
]
