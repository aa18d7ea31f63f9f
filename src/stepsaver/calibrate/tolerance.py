"""What "keeps quality" means to a user: a tolerance on LPIPS, PSNR or SSIM against a reference.

A tolerance is written the way people say it: ``"lpips<=0.05"`` (on the mean over prompts) or
``"lpips<=0.05 for 95%"`` (at least 95% of prompts each within it). Each metric has one
direction (LPIPS is a distance, PSNR and SSIM are similarities), so ``"psnr<=35"`` is refused
rather than read as a wish for worse images.

Whether a tolerance *holds* on a prompt set is a statistic (the mean, or the share of prompts
within the bound) and an interval around it: a paired bootstrap over prompts for the mean, the
Wilson score interval for a share (a bootstrap of a share collapses to a point when no prompt
fails, and the Wilson interval does not). "Holds with confidence" means the interval's worse end
is inside the tolerance, which is what a held-out check must show before anyone relies on it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from stepsaver.errors import StepsaverError

__all__ = ["METRICS", "Tolerance", "parse_tolerance"]

# metric -> the comparison that means "good enough" (lower is better for a distance)
METRICS: dict[str, str] = {"lpips": "<=", "psnr": ">=", "ssim": ">="}
FORMS = "'lpips<=0.05', 'psnr>=35', 'ssim>=0.95', optionally followed by ' for 95%' (a share of prompts)"
_PATTERN = re.compile(r"^\s*(?P<metric>[a-z]+)\s*(?P<op><=|>=|<|>|=<|=>)\s*(?P<bound>[-+0-9.eE]+)\s*"
                      r"(?:(?:for|@)\s*(?P<share>[0-9.]+)\s*%\s*(?:of\s+(?:the\s+)?prompts)?)?\s*$", re.IGNORECASE)
Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class Tolerance:
    """``metric`` within ``bound`` on the mean (``share=None``) or for a ``share`` of prompts."""

    metric: str
    bound: float
    share: float | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise StepsaverError(f"unknown tolerance metric {self.metric!r}; allowed forms: {FORMS}")
        if not isinstance(self.bound, (int, float)) or isinstance(self.bound, bool) or not math.isfinite(self.bound):
            raise StepsaverError(f"tolerance bound must be a finite number, got {self.bound!r}; allowed forms: {FORMS}")
        low, high = {"lpips": (0.0, 1.0), "ssim": (-1.0, 1.0), "psnr": (0.0, 200.0)}[self.metric]
        inside = low < self.bound <= high if self.metric == "lpips" else low <= self.bound < high
        if not inside:
            raise StepsaverError(f"a {self.metric} tolerance bound must lie in {low}..{high}, got {self.bound:g}")
        if self.share is not None and not 0.0 < self.share <= 1.0:
            raise StepsaverError(f"the share of prompts must be in (0%, 100%], got {self.share * 100:g}%")

    @property
    def op(self) -> str:
        return METRICS[self.metric]

    @property
    def lower_is_better(self) -> bool:
        return self.op == "<="

    def __str__(self) -> str:
        text = f"{self.metric}{self.op}{self.bound:g}"
        return text if self.share is None else f"{text} for {self.share * 100:g}%"

    def within(self, values: np.ndarray) -> np.ndarray:
        """Per prompt: is its value within the bound."""
        v = np.asarray(values, dtype=float)
        return v <= self.bound if self.lower_is_better else v >= self.bound

    def statistic(self, values: np.ndarray) -> float:
        """The mean metric, or the share of prompts within the bound."""
        v = _checked(values, self.metric)
        return float(v.mean()) if self.share is None else float(self.within(v).mean())

    def holds(self, values: np.ndarray) -> bool:
        """The tolerance holds on these prompts (point estimate)."""
        return self._meets(self.statistic(values))

    def _meets(self, stat: float) -> bool:
        if self.share is not None:
            return stat >= self.share - 1e-12
        return stat <= self.bound if self.lower_is_better else stat >= self.bound

    def interval(self, values: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
        """95% interval of :meth:`statistic` over prompts (bootstrap of the mean; Wilson for a share)."""
        v = _checked(values, self.metric)
        if self.share is not None:
            return wilson(int(self.within(v).sum()), len(v))
        if len(v) == 1:
            return float(v[0]), float(v[0])
        rng = np.random.default_rng(seed)
        means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
        lo, hi = np.quantile(means, [0.025, 0.975])
        return float(lo), float(hi)

    def worse_end(self, values: np.ndarray, n_boot: int = 2000, seed: int = 0) -> float:
        """The end of the interval on the failing side (upper for LPIPS means, lower otherwise)."""
        lo, hi = self.interval(values, n_boot, seed)
        return hi if self.share is None and self.lower_is_better else lo

    def holds_with_confidence(self, values: np.ndarray, n_boot: int = 2000, seed: int = 0) -> bool:
        """The interval's worse end is inside the tolerance."""
        return self._meets(self.worse_end(values, n_boot, seed))

    def worse_end_at(self, values: np.ndarray, n: int, selection: float = 0.0) -> float:
        """The worse end of the 95% interval a sample of ``n`` prompts like these is expected to give.

        The calibration prompts choose and ``n`` held-out prompts validate; a setting whose own
        interval only just fits on the calibration part fails the held-out check, whose interval
        is wider by ``sqrt(n_calibration / n)``. This is the interval that check will compute,
        predicted from the calibration sample: normal approximation of the mean (the
        bootstrap's large-sample limit) or Wilson's interval of the same share at ``n``.

        ``selection`` (a critical value from :meth:`selection_critical`) first moves the
        calibration estimate that many standard errors towards failing: the cheapest of many
        settings that pass is, on average, one the calibration prompts flattered (the winner's
        curse), so the prediction starts from the worst truth the settings' simultaneous bound
        allows rather than from the flattering estimate. 0 predicts from the estimate itself.
        """
        v = _checked(values, self.metric)
        if self.share is not None:
            p = float(self.within(v).mean())
            if selection > 0:
                p = wilson(int(self.within(v).sum()), len(v), z=selection)[0]
            return wilson(round(p * n), n)[0]
        sd = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        half = Z95 * sd / math.sqrt(n) + selection * sd / math.sqrt(len(v))
        return float(v.mean()) + (half if self.lower_is_better else -half)

    def expected_to_validate(self, values: np.ndarray, n: int, selection: float = 0.0) -> bool:
        """Whether a held-out sample of ``n`` prompts like these should show the tolerance with confidence."""
        return self._meets(self.worse_end_at(values, n, selection))

    def selection_critical(self, samples: Sequence[np.ndarray], n_boot: int = 2000, seed: int = 0) -> float:
        """How many standard errors the luckiest of these settings may flatter itself by (97.5%, one-sided).

        Why: calibration compares many settings on the same prompts and keeps the cheapest that
        passes, so its estimate is biased towards passing. A bound that holds for every compared
        setting at once is free of that bias. For a mean it is the max-t bootstrap (Romano and
        Wolf): resample prompts jointly for all settings (they are paired, and strongly
        correlated, so this is far tighter than Bonferroni) and take the 97.5% quantile of the
        largest standardised deviation towards failing. It is floored at the single-setting
        1.96 and capped at Bonferroni's ``z(0.025 / k)``; a share uses Bonferroni's value
        (its standard error vanishes when no prompt fails). ``samples``: per-setting values over
        the *same* prompts, in the same order.
        """
        rows = [_checked(s, self.metric) for s in samples]
        k = len(rows)
        if k <= 1:
            return Z95
        bonferroni = NormalDist().inv_cdf(1 - 0.025 / k)
        if self.share is not None or len({len(r) for r in rows}) != 1 or len(rows[0]) < 2:
            return bonferroni
        v = np.stack(rows)
        se = v.std(axis=1, ddof=1) / math.sqrt(v.shape[1])
        v, se = v[se > 0], se[se > 0]
        if len(v) == 0:
            return Z95
        rng = np.random.default_rng(seed)
        boot = v[:, rng.integers(0, v.shape[1], size=(n_boot, v.shape[1]))].mean(axis=-1)  # (k, n_boot)
        deviation = (v.mean(axis=1, keepdims=True) - boot) if self.lower_is_better else (
            boot - v.mean(axis=1, keepdims=True))
        q = float(np.quantile((deviation / se[:, None]).max(axis=0), 0.975))
        return float(min(max(q, Z95), bonferroni))

    def slack(self, values: np.ndarray) -> float:
        """How far inside the tolerance the statistic is (negative: outside), in the statistic's units."""
        stat = self.statistic(values)
        if self.share is not None:
            return stat - self.share
        return self.bound - stat if self.lower_is_better else stat - self.bound

    def to_dict(self) -> dict:
        return {"text": str(self), "metric": self.metric, "bound": self.bound, "share": self.share}


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n <= 0:
        raise StepsaverError("no prompts to measure a share on")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _checked(values: np.ndarray, metric: str) -> np.ndarray:
    v = np.asarray(values, dtype=float).ravel()
    if v.size == 0:
        raise StepsaverError(f"no {metric} values to check the tolerance on")
    if metric == "psnr":
        v = np.minimum(v, 100.0)  # identical images have infinite PSNR; 100 dB is identical for 8-bit images
    if not np.isfinite(v).all():
        raise StepsaverError(f"{metric} values contain NaN or infinity; the renders compared are not finite images")
    return v


def parse_tolerance(text: str | Tolerance) -> Tolerance:
    """``"lpips<=0.05"``, ``"psnr>=35"``, ``"ssim>=0.95 for 90%"`` -> :class:`Tolerance` (one-line errors)."""
    if isinstance(text, Tolerance):
        return text
    if not isinstance(text, str) or not text.strip():
        raise StepsaverError(f"tolerance is empty; allowed forms: {FORMS}")
    m = _PATTERN.match(text)
    if m is None:
        raise StepsaverError(f"cannot read tolerance {text!r}; allowed forms: {FORMS}")
    metric = m["metric"].lower()
    if metric not in METRICS:
        raise StepsaverError(f"unknown tolerance metric {metric!r} in {text!r}; allowed forms: {FORMS}")
    op = {"=<": "<=", "=>": ">=", "<": "<=", ">": ">="}.get(m["op"], m["op"])
    if op != METRICS[metric]:
        better = "lower" if METRICS[metric] == "<=" else "higher"
        raise StepsaverError(f"{metric} is better {better}, so its tolerance is written {metric}{METRICS[metric]}"
                             f"BOUND, not {text.strip()!r}; allowed forms: {FORMS}")
    try:
        bound = float(m["bound"])
        share = None if m["share"] is None else float(m["share"]) / 100.0
    except ValueError:
        raise StepsaverError(f"cannot read the numbers in tolerance {text!r}; allowed forms: {FORMS}") from None
    return Tolerance(metric, bound, share)
