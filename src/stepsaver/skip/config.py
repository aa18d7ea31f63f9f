"""The settings of Skip, importable without torch or diffusers (the CLI reads its defaults).

``MIN_WARMUP`` lives here for the same reason: the config validates against it and the
criterion (:mod:`stepsaver.skip.criterion`) takes it as its default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stepsaver.errors import StepsaverError

__all__ = ["COMPAT_DEFAULTS", "DEFAULT_RULE", "MIN_WARMUP", "REUSES", "RULES", "RULE_DEFAULTS", "SCALES",
           "AdaptiveSkipConfig", "adds_fresh_noise"]

SCALES = ("latent", "sigma")  # what D_j measures (see AdaptiveSkipConfig.scale)
REUSES = ("auto", "output", "noise", "x0")  # what a skipped step reuses (see AdaptiveSkipConfig.reuse)
RULES = ("criterion", "fixed", "drift")  # what decides a skip (see AdaptiveSkipConfig.rule)

MIN_WARMUP = 4  # D_1, D_2, D_3 exist once step 3 has run; the first decision is for step 4

DEFAULT_RULE = "drift"
# (threshold, max_skips) each rule gets when they are left out. The criterion's pair was the default
# until the drift rule replaced it (docs/results/skip.md, caches.md: at equal calls the criterion acts
# as a fixed interval of C_max + 1 steps; the drift rule beats or ties that interval and holds quality
# across schedulers). Drift 0.1 / 6 was tuned on training-split prompts of the embedded model.
RULE_DEFAULTS: dict[str, tuple[float, int]] = {"drift": (0.1, 6), "criterion": (0.02, 4), "fixed": (0.0, 4)}
COMPAT_DEFAULTS = (0.01, 4)  # the paper's delta and C_max for SD-1.5/SDXL (what compat=True reproduces)

# Schedulers whose step adds fresh noise (ancestral / SDE samplers, and the multistep consistency
# ones that re-noise between steps): a reused noise prediction there disagrees with the noise the
# latent now carries, so reuse="auto" reuses the data prediction instead.
_NOISE_ADDING = frozenset({"EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DDPMScheduler",
                           "DPMSolverSDEScheduler", "LCMScheduler", "TCDScheduler", "DDPMWuerstchenScheduler",
                           "CMStochasticIterativeScheduler"})


def adds_fresh_noise(scheduler: object) -> bool:
    """Whether ``scheduler``'s step injects new noise (what ``reuse="auto"`` turns to ``"x0"`` for).

    By class, plus the SDE variants of the DPM-Solver family (``algorithm_type="sde-dpmsolver..."``).
    DDIM with ``eta > 0`` also adds noise, but ``eta`` is a call argument the config cannot see; pass
    ``reuse="x0"`` there.
    """
    if type(scheduler).__name__ in _NOISE_ADDING:
        return True
    algorithm = getattr(getattr(scheduler, "config", None), "algorithm_type", None)
    return isinstance(algorithm, str) and algorithm.startswith("sde")


@dataclass(frozen=True)
class AdaptiveSkipConfig:
    """Settings of AdaptiveDiffusion skipping (frozen and hashable: it keys batches and caches).

    Its defaults are the one place the shipped skip settings are written; the CLI, the service
    and the benchmarks read them from here.

    Args:
        threshold: what the rule compares against; left out (``None``), the rule's own default
            (:data:`RULE_DEFAULTS`: drift 0.1, criterion 0.02; 0.01 with ``compat=True``). For the
            drift rule (default) it is the relative error of reuse that may build up (0.1 = 10%).
            For the criterion it is delta of ``|(D_j + D_{j-2})/2 - D_{j-1}| <= delta * D_{j-1}``:
            0.02 is ours for ``scale="sigma"`` (chosen on training-split prompts over every
            scheduler of the registry at 30 and 50 steps); 0.01 is the paper's value for latent
            differences on SD-1.5/SDXL (0.004 for LDM), the one to pass with ``scale="latent"``.
            Larger skips more. ``0`` never skips (output bit-identical to the plain pipeline).
        max_skips: C_max, the most consecutive steps that may reuse the cache; left out, the
            rule's default (drift 6, criterion 4 as for SD-1.5/SDXL; the paper uses 6 for LDM).
            ``0`` never skips.
        warmup: steps ``0 .. warmup-1`` always run the denoiser; at least 4 (the criterion needs
            D_1..D_3, known after step 3).
        per_sample: one skip path per sample of the batch (ours); ``False`` shares one path, decided
            on the whole batch's latent difference, with C_max enforced from the first decision.
        compat: reproduce the official implementation's decisions exactly: one path per batch,
            C_max enforced only from the sixth decision, decisions per ``scheduler.step`` call
            (also the half steps of Heun/DPM2), differences in the latents' dtype, ties skip even
            at ``threshold=0``. Implies a shared path (``per_sample`` is then ignored),
            ``scale="latent"`` and ``reuse="output"`` (set for you); needs ``warmup=4``. State still
            resets every call (the official code does not).
        scale: what ``D_j`` measures. ``"latent"`` (the paper's): the mean absolute change of
            the latent over step ``j``; it assumes DDIM-like steps of similar size. ``"sigma"`` (default): the
            same change in the scheduler's probability-flow ODE variable (``x / alpha``, the
            variance-exploding form shared by every diffusers scheduler) per unit of noise level
            ``sigma`` crossed by the step, i.e. the speed of the trajectory, so steps of very
            different sizes (Karras/Euler sigmas, flow matching shifts) compare fairly.
        reuse: what a skipped step reuses. ``"auto"`` (default): ``"x0"`` on schedulers that add
            fresh noise every step (:func:`adds_fresh_noise`: Euler-a, DPM2-a, DDPM, SDE solvers,
            LCM), else ``"noise"``; the report names the one used. ``"output"``: the denoiser's raw
            output (the official code). ``"noise"``: the noise prediction, as the paper states it; on a v-prediction
            model the cached ``v`` is turned into ``eps`` at its own step and back into ``v`` at
            the skipped one (a raw ``v`` mixes ``eps`` and ``x0`` in proportions that change with
            the noise level). The same as ``"output"`` on epsilon and flow models. ``"x0"``: the
            data prediction, re-expressed at the new step and latent (the noise part then follows
            the latent, which matters for ancestral samplers that add fresh noise every step:
            with noise reuse the drift rule measured Euler-a's reuse as wrong and never skipped).
        rule: what decides a skip. ``"drift"`` (default) or ``"criterion"``: the third-order test above
            (the paper's rule; the default until the drift rule beat it, see below).
            ``"fixed"``: no test: after the warm-up every step reuses the cache until C_max
            consecutive reuses force a call, i.e. one denoiser call every ``max_skips + 1`` steps.
            It is the non-adaptive baseline at the same reuse machinery (DeepCache's and
            TaylorSeer's uniform interval, at the level of whole calls): the criterion has to beat
            it at equal calls to be worth its name. ``threshold`` is ignored.
            ``"drift"``: reuse while the *estimated error of reusing*, relative to the output,
            stays ``<= threshold``. At every computed step the hook also builds what reuse would
            have returned there (the cached output re-expressed at this step, as a skip would) and
            measures its relative error ``e = mean|fresh - reused| / mean|fresh|`` per sample;
            ``e / gap`` (``gap`` = steps since that sample's previous call) is the error added per
            reused step, and step ``m`` is skipped while ``rate * (m - last call) <= threshold``.
            Why: with ``scale="sigma"`` and noise reuse a skipped step moves the latent at exactly
            the cached speed, so after a skip the third-order test sees a straight line and nearly
            always passes; C_max then decides, and the criterion acts as a fixed interval of
            ``max_skips + 1`` (measured on both embedded models, docs/results/caches.md). The
            drift rule only learns from computed outputs, so its skips follow how fast the
            denoiser's output actually changes. Its threshold is a relative error (0.1 = 10%),
            not the criterion's delta (its default 0.1 with ``max_skips=6``); ``max_skips``
            still bounds a run. Left out (``None``): drift, or the criterion with ``compat=True``.

    ``threshold`` and ``max_skips`` are resolved at construction, so two configs that run alike
    compare and hash alike whether the defaults were written out or not.
    """

    threshold: float | None = None
    max_skips: int | None = None
    warmup: int = MIN_WARMUP
    per_sample: bool = True
    compat: bool = False
    scale: str = "sigma"
    reuse: str = "auto"
    rule: str | None = None  # None: DEFAULT_RULE, or the criterion with compat=True

    def __post_init__(self) -> None:
        if self.rule is None:
            object.__setattr__(self, "rule", "criterion" if self.compat is True else DEFAULT_RULE)
        if self.compat is True:  # the official code: the criterion on raw latent differences, raw outputs reused
            object.__setattr__(self, "scale", "latent")
            object.__setattr__(self, "reuse", "output")
        defaults = COMPAT_DEFAULTS if self.compat is True else \
            RULE_DEFAULTS.get(self.rule) if isinstance(self.rule, str) else None
        if defaults is not None:
            if self.threshold is None:
                object.__setattr__(self, "threshold", defaults[0])
            if self.max_skips is None:
                object.__setattr__(self, "max_skips", defaults[1])
        self.validate()

    def reuse_for(self, scheduler: object) -> str:
        """The reuse this config makes on ``scheduler`` (``"auto"`` resolved)."""
        if self.reuse != "auto":
            return self.reuse
        return "x0" if adds_fresh_noise(scheduler) else "noise"

    def validate(self) -> None:
        """Raise :class:`StepsaverError` (one line) on a setting that cannot work."""
        if self.rule not in RULES:
            raise StepsaverError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise StepsaverError(f"skip threshold must be a finite number >= 0 (e.g. 0.01), got {t!r}")
        for name, low in (("max_skips", 0), ("warmup", MIN_WARMUP)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise StepsaverError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("per_sample", "compat"):
            if not isinstance(getattr(self, name), bool):
                raise StepsaverError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.scale not in SCALES:
            raise StepsaverError(f"scale must be one of {', '.join(SCALES)}, got {self.scale!r}")
        if self.reuse not in REUSES:
            raise StepsaverError(f"reuse must be one of {', '.join(REUSES)}, got {self.reuse!r}")
        if self.rule != "criterion" and self.compat:
            raise StepsaverError(f"compat mode reproduces the official criterion; the {self.rule} rule is not it "
                                 f"(drop compat=True or rule={self.rule!r})")
        if self.compat and self.warmup != MIN_WARMUP:
            raise StepsaverError(f"compat mode reproduces the official code, whose warmup is {MIN_WARMUP}; "
                                 f"got warmup={self.warmup}")

    @property
    def mode(self) -> str:
        """``"compat"``, ``"per_sample"`` or ``"shared"``."""
        return "compat" if self.compat else ("per_sample" if self.per_sample else "shared")
