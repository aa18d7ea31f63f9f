"""The search space of ``calibrate``: every way stepsaver can make an image cheaper, as one candidate.

A :class:`Candidate` is one setting of all the knobs at once: scheduler, step count (or the
recommender at a confidence, which picks a step count per prompt), Skip (threshold, C_max) or
off, and, where the denoiser takes them, one of diffusers' caches. Candidates are frozen and
JSON-able: the chosen one *is* what the config file stores and what ``generate --config`` runs.

A candidate renders each prompt through one :class:`RenderKey` (scheduler, steps, skip, cache):
the recommender's candidates share the fixed-step renders of the step count they pick, so
adding the recommender to the search costs recommendations, not new images, wherever its step
counts are on the grid.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from stepsaver.caches import CACHE_KINDS, CacheSpec
from stepsaver.errors import StepsaverError

__all__ = ["DRIFT", "FAMILIES", "FIXED", "OWN", "Candidate", "RenderKey", "SearchSpace", "skip_config", "skip_rule"]

OWN = "own"  # the scheduler the pipeline came with (flow-matching models have no registry alternative)
# single-knob families (the baselines a combination must beat) and the rest
FAMILIES = ("steps", "skip", "recommender", "cache", "scheduler", "combined", "reference")


FIXED = math.inf
"""The threshold slot of a fixed-interval Skip setting, ``(FIXED, max_skips)``: Skip's ``rule="fixed"``
(one call every ``max_skips + 1`` steps after the warm-up, no criterion). Infinity because it sits
above every threshold in the orders the search prunes by (it reuses whenever C_max allows); it
never reaches a file: :func:`skip_dict` writes ``{"rule": "fixed", "max_skips": m}``."""

DRIFT = "drift"
"""The third slot of a drift-rule Skip setting, ``(threshold, max_skips, DRIFT)``: Skip's
``rule="drift"`` (reuse while the measured reuse error stays under ``threshold``). Its threshold is
a relative error, not the criterion's delta, so the search never orders the two against each other."""


def skip_rule(skip: tuple | None) -> str | None:
    """``"criterion"``, ``"fixed"`` or ``"drift"`` for a Skip setting tuple (``None``: Skip off)."""
    if skip is None:
        return None
    if len(skip) > 2 and skip[2] == DRIFT:
        return "drift"
    return "fixed" if skip[0] == FIXED else "criterion"


def skip_config(skip: tuple[float, int] | None) -> Any:
    """The :class:`~stepsaver.skip.AdaptiveSkipConfig` of a ``(threshold, max_skips)`` pair (None: off)."""
    if skip is None:
        return None
    from stepsaver.skip.config import AdaptiveSkipConfig

    rule = skip_rule(skip)
    if rule == "fixed":
        return AdaptiveSkipConfig(rule="fixed", max_skips=skip[1])
    return AdaptiveSkipConfig(threshold=skip[0], max_skips=skip[1], rule=rule)


def skip_dict(skip: tuple[float, int] | None) -> dict[str, Any] | None:
    """A Skip setting as JSON (finite numbers only)."""
    if skip is None:
        return None
    rule = skip_rule(skip)
    if rule == "fixed":
        return {"rule": "fixed", "max_skips": skip[1]}
    if rule == "drift":
        return {"rule": "drift", "threshold": skip[0], "max_skips": skip[1]}
    return {"threshold": skip[0], "max_skips": skip[1]}


def _skip_from_dict(data: dict[str, Any]) -> tuple:
    rule = data.get("rule", "criterion")
    if rule == "fixed":
        return FIXED, int(data["max_skips"])
    if rule == "drift":
        return float(data["threshold"]), int(data["max_skips"]), DRIFT
    if rule != "criterion":
        raise ValueError(f"unknown skip rule {rule!r}")
    return float(data["threshold"]), int(data["max_skips"])


@dataclass(frozen=True)
class RenderKey:
    """What one image is made with; its :attr:`digest` names its folder in the render cache."""

    scheduler: str
    steps: int
    skip: tuple[float, int] | None = None
    cache: CacheSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler, "steps": self.steps,
                "skip": skip_dict(self.skip), "cache": None if self.cache is None else self.cache.to_dict()}

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Candidate:
    """One configuration: ``steps`` fixed, or ``confidence`` set (the recommender picks steps)."""

    scheduler: str = OWN
    steps: int | None = None
    skip: tuple[float, int] | None = None
    confidence: float | None = None
    cache: CacheSpec | None = None

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.confidence is None):
            raise StepsaverError("a candidate has either a step count or a recommender confidence, not both")
        if self.skip is not None and self.cache is not None:
            raise StepsaverError("Skip and a diffusers cache both decide which computation to reuse; "
                                 "a candidate takes one of them")

    def key(self, steps: int) -> RenderKey:
        """The render of one prompt whose step count is ``steps``."""
        return RenderKey(self.scheduler, steps, self.skip, self.cache)

    def family(self, reference: Candidate) -> str:
        """Which single knob differs from the reference (``"combined"`` when several do)."""
        if self == reference:
            return "reference"
        changed = [name for name, differs in (
            ("scheduler", self.scheduler != reference.scheduler),
            ("steps", self.steps is not None and self.steps != reference.steps),
            ("skip", self.skip is not None), ("recommender", self.confidence is not None),
            ("cache", self.cache is not None)) if differs]
        return changed[0] if len(changed) == 1 else "combined"

    @property
    def label(self) -> str:
        parts = [self.scheduler, f"{self.steps} steps" if self.steps is not None
                 else f"recommender@{self.confidence:g}"]
        if self.skip is not None:
            rule = skip_rule(self.skip)
            parts.append(f"skip every {self.skip[1] + 1}th step (fixed)" if rule == "fixed"
                         else f"skip drift {self.skip[0]:g}/C{self.skip[1]}" if rule == "drift"
                         else f"skip {self.skip[0]:g}/C{self.skip[1]}")
        if self.cache is not None:
            parts.append(self.cache.label)
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler, "steps": self.steps, "confidence": self.confidence,
                "skip": skip_dict(self.skip), "cache": None if self.cache is None else self.cache.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Candidate:
        try:
            skip = data.get("skip")
            cache = data.get("cache")
            return cls(scheduler=str(data.get("scheduler", OWN)), steps=data.get("steps"),
                       skip=None if skip is None else _skip_from_dict(skip),
                       confidence=data.get("confidence"),
                       cache=None if cache is None else CacheSpec.from_dict(cache))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StepsaverError(f"cannot read a calibrated setting from {data!r} ({exc})") from None


@dataclass(frozen=True)
class SearchSpace:
    """The knobs ``calibrate`` tries (every combination, pruned as the search goes).

    Defaults span what the embedded models can use: the step grid from 4 to the reference,
    Skip thresholds around our default (0.02) with C_max 2 and 4 (Skip only from
    ``skip_min_steps``: below it the warm-up leaves nothing to save), the recommender at three
    confidences when one is given, and diffusers' FirstBlockCache and TaylorSeer where the
    denoiser is a CacheMixin.
    """

    schedulers: tuple[str, ...] = (OWN,)
    steps: tuple[int, ...] = (4, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50)
    skip_thresholds: tuple[float, ...] = (0.01, 0.02, 0.04, 0.08)
    skip_max: tuple[int, ...] = (2, 4)
    fixed_skips: bool = True  # also Skip's fixed rule at each C_max: the baseline the criterion must beat
    drift_thresholds: tuple[float, ...] = (0.08, 0.15)  # Skip's drift rule (relative reuse error)
    drift_max: int = 6
    skip_min_steps: int = 10
    confidences: tuple[float, ...] = (0.5, 0.7, 0.9)
    caches: tuple[CacheSpec, ...] = field(default_factory=lambda: (
        CacheSpec("fbc", (("threshold", 0.05),)), CacheSpec("fbc", (("threshold", 0.1),)),
        CacheSpec("fbc", (("threshold", 0.2),)), CacheSpec("taylorseer", (("interval", 2), ("order", 1))),
        CacheSpec("taylorseer", (("interval", 3), ("order", 1))), CacheSpec("pab", (("skip", 2),))))

    def validate(self, reference_steps: int) -> None:
        if not self.schedulers:
            raise StepsaverError("the search needs at least one scheduler")
        if not self.steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.steps):
            raise StepsaverError(f"step counts must be integers >= 1, got {self.steps}")
        for t in (*self.skip_thresholds, *self.drift_thresholds):
            if not isinstance(t, (int, float)) or not t >= 0 or t != t or t == float("inf"):
                raise StepsaverError(f"skip thresholds must be finite numbers >= 0, got {t!r}")
        for c in self.confidences:
            if not isinstance(c, (int, float)) or not 0 < c <= 1:
                raise StepsaverError(f"recommender confidences must be in (0, 1], got {c!r}")
        if reference_steps < 1:
            raise StepsaverError(f"reference steps must be >= 1, got {reference_steps}")

    def candidates(self, reference: Candidate, recommender: bool,
                   caches: bool | Sequence[str]) -> list[Candidate]:
        """Every combination this space allows (the reference itself included, at no cost).

        ``caches``: the diffusers cache kinds the denoiser takes (:func:`stepsaver.caches.cache_kinds_for`:
        every kind on a CacheMixin transformer, PAB on a UNet), or a bool for all / none.
        """
        top = reference.steps or max(self.steps)
        grid = sorted({s for s in self.steps if s <= top} | {top})
        skips: list[tuple[float, int] | None] = [None] + [(t, m) for t in self.skip_thresholds
                                                          for m in self.skip_max if t > 0 and m > 0]
        if self.fixed_skips:
            skips += [(FIXED, m) for m in self.skip_max if m > 0]
        if self.drift_max > 0:
            skips += [(t, self.drift_max, DRIFT) for t in self.drift_thresholds if t > 0]
        kinds = set(CACHE_KINDS) if caches is True else set(caches or ())
        out: list[Candidate] = []
        for scheduler in self.schedulers:
            for skip in skips:
                for steps in grid:
                    if skip is None or steps >= self.skip_min_steps:
                        out.append(Candidate(scheduler, steps, skip))
                if recommender:
                    out += [Candidate(scheduler, None, skip, c) for c in self.confidences]
            out += [Candidate(scheduler, steps, None, None, cache) for cache in self.caches
                    if cache.kind in kinds for steps in grid if steps >= self.skip_min_steps]
        return list(dict.fromkeys(out))
