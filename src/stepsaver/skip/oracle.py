"""A greedy skip oracle: which steps *could* reuse the previous denoiser output, found by trying.

AdaptiveDiffusion's estimator guesses from the latents' third-order differences which steps are
redundant. The oracle answers the same question by brute force, for one prompt: walk the steps
in order and mark step ``j`` skipped (it reuses the previous raw denoiser output, the scheduler
still steps) whenever the run with that skip added to the skips already chosen ends within a
tolerance of the full-step run. C_max (at most ``max_skips`` skips in a row) is honoured, and the
walk starts at the estimator's first decidable step (``first=4``), so both paths live on the
same positions and can be compared (the paper's Fig. 4).

**Tolerance** is on the *final latent*, as a relative L2 error
``||x - x_full||_2 / ||x_full||_2`` over the whole latent tensor (float64). Latents are what the
skips change directly and what every pipeline returns with ``output_type="latent"``, so the
oracle needs no VAE decode and works unchanged on any pipeline; for image-space numbers decode
both latents afterwards. ``tolerance=0`` keeps only skips that leave the final latent bit for bit
unchanged.

**Cost.** The walk is O(steps) runs. Each trial ``S + {j}`` shares steps ``0 .. j-1`` with the
current accepted run ``S`` (same inputs, same decisions), so those denoiser calls are not run
again: the hook hands back the outputs recorded from the accepted run. This is exact (the same
tensors the network produced for the same inputs; the scheduler, guidance and VAE still run)
and halves the network work (about ``steps^2 / 2`` calls instead of ``steps^2``).

**Attach, don't fork.** The forced path runs through the Skip hook itself with a
:class:`ForcedSkipPolicy` (a given set of steps instead of the criterion, and a replayed prefix);
it is registered like the Skip hook and removed by :func:`~stepsaver.skip.hook.disable_adaptive_skip`.

Agreement between oracle and estimator paths is measured by pure functions over lists of flags:
:func:`path_agreement`, :func:`position_agreement`, :func:`skip_position_chi2`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from stepsaver.calls import denoiser_of
from stepsaver.errors import StepsaverError
from stepsaver.skip.config import MIN_WARMUP, AdaptiveSkipConfig
from stepsaver.skip.criterion import consecutive_skips
from stepsaver.skip.hook import (
    HOOK_NAME,
    AdaptiveSkipHook,
    SkipPolicy,
    disable_adaptive_skip,
    enable_adaptive_skip,
    skip_report,
    split_output,
)

__all__ = ["ForcedSkipPolicy", "OracleResult", "forced_skips", "greedy_oracle", "path_agreement",
           "position_agreement", "relative_l2", "run_skip_path", "skip_position_chi2"]

# (step, raw denoiser output, function rebuilding the denoiser's output object around it)
_Record = tuple[int, torch.Tensor, Callable[[torch.Tensor], Any]]


class ForcedSkipPolicy(SkipPolicy):
    """A skip policy of given steps instead of the criterion, with an optional replayed prefix.

    ``plan(skips, replay, replay_before)`` sets up the next pipeline call: steps in ``skips`` reuse
    the previous denoiser output; denoiser runs of steps ``< replay_before`` are answered, in order,
    from ``replay`` (the ``record`` of an earlier call that made the same decisions on those steps).
    After the call, ``record`` holds every denoiser output the call used, replayed or computed, and
    ``network_runs`` counts the real forward passes.
    """

    per_sample = False

    def __init__(self) -> None:
        self.skips: frozenset[int] = frozenset()
        self.replay: list[_Record] = []
        self.replay_before = 0
        self.record: list[_Record] = []
        self.network_runs = 0

    def plan(self, skips: Sequence[int] = (), replay: Sequence[_Record] = (), replay_before: int = 0) -> None:
        bad = [s for s in skips if not isinstance(s, int) or s < 1]
        if bad:
            raise StepsaverError(f"forced skips must be steps >= 1 (step 0 has no output to reuse), got {bad}")
        self.skips = frozenset(skips)
        self.replay, self.replay_before = list(replay), replay_before
        self.record, self.network_runs = [], 0

    def decide(self, diffs: list[Any], path: list[Any], batch: int) -> bool:
        return len(path) in self.skips  # path holds steps 0..j: this decides step j + 1

    def run(self, step: int, forward: Callable[[], Any]) -> Any:
        n = len(self.record)
        if step < self.replay_before and n < len(self.replay) and self.replay[n][0] == step:
            entry = self.replay[n]  # recorded tensors are never edited in place
            self.record.append(entry)
            return entry[2](entry[1].clone())
        out = forward()
        main, rebuild = split_output(out)
        self.network_runs += 1
        self.record.append((step, main.detach().clone(), rebuild))
        return out


@contextlib.contextmanager
def forced_skips(pipe: Any) -> Iterator[ForcedSkipPolicy]:
    """Attach the Skip hook with a :class:`ForcedSkipPolicy` to ``pipe`` for the ``with`` block.

    Yields the policy (``plan`` it before each call); the hook is removed afterwards.
    """
    denoiser = denoiser_of(pipe, "run the skip oracle on")
    registry = getattr(denoiser, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK_NAME) is not None:
        raise StepsaverError("adaptive skip is enabled on this pipeline; call disable_adaptive_skip(pipe) "
                             "before running the oracle")
    scheduler = getattr(pipe, "scheduler", None)
    if not (callable(getattr(scheduler, "step", None)) and callable(getattr(scheduler, "set_timesteps", None))):
        raise StepsaverError(f"{type(pipe).__name__} has no diffusers scheduler (step/set_timesteps) to follow")
    from diffusers.hooks import HookRegistry

    policy = ForcedSkipPolicy()
    hook = AdaptiveSkipHook(AdaptiveSkipConfig(threshold=0.0, per_sample=False), pipe, policy=policy)
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    registry.register_hook(hook, HOOK_NAME)
    try:
        hook.bind_scheduler(scheduler)
        yield policy
    finally:
        disable_adaptive_skip(pipe)
        pipe.__dict__.pop("adaptive_skip_report", None)


def relative_l2(x: torch.Tensor, reference: torch.Tensor) -> float:
    """``||x - reference||_2 / ||reference||_2`` in float64 (0 when equal; ``inf`` for a zero reference)."""
    a, b = x.detach().double().cpu(), reference.detach().double().cpu()
    if a.shape != b.shape:
        raise StepsaverError(f"latents to compare differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    num, den = float(torch.linalg.vector_norm(a - b)), float(torch.linalg.vector_norm(b))
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def _final_latent(pipe: Any, prompt: str, steps: int, seed: int, guidance: float, **kwargs: Any) -> torch.Tensor:
    """One run of ``pipe`` returning its final latent ``[1, C, h, w]`` (same seed: the same noise every time)."""
    from stepsaver.generation import generate_images

    result = generate_images(pipe, [prompt], steps=steps, seeds=seed, guidance=guidance, output_type="latent",
                             **kwargs)[0]
    return torch.stack(result.images).detach().clone()


def run_skip_path(pipe: Any, prompt: str, skips: Sequence[int], steps: int = 50, seed: int = 0,
                  guidance: float = 5.0, **kwargs: Any) -> torch.Tensor:
    """The final latent of ``pipe`` on ``prompt`` with exactly the steps in ``skips`` reusing the cache."""
    with forced_skips(pipe) as hook:
        hook.plan(list(skips))
        return _final_latent(pipe, prompt, steps, seed, guidance, **kwargs)


@dataclass
class OracleResult:
    """The oracle's path for one prompt, next to the estimator's (when asked for).

    ``path[s]`` is ``True`` when step ``s`` reuses the previous output. ``errors[s]`` is the relative
    L2 error of the trial that added step ``s`` (``None`` where no trial ran: before ``first`` or
    blocked by C_max). ``final_error`` is the error of the accepted path, ``network_runs`` the
    real denoiser forward passes the whole search cost (reference run included).
    """

    prompt: str
    steps: int
    seed: int
    guidance: float
    scheduler: str
    tolerance: float
    max_skips: int
    first: int
    path: list[bool]
    errors: list[float | None]
    final_error: float
    trials: int
    network_runs: int
    seconds: float
    estimator_path: list[bool] | None = None
    estimator_error: float | None = None
    estimator_config: dict[str, Any] = field(default_factory=dict)

    @property
    def skipped_steps(self) -> list[int]:
        return [s for s, skip in enumerate(self.path) if skip]

    def agreement(self) -> float | None:
        """Share of positions ``first..steps-1`` where oracle and estimator made the same decision."""
        if self.estimator_path is None:
            return None
        return path_agreement(self.path, self.estimator_path, self.first)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "skipped_steps": self.skipped_steps, "agreement": self.agreement(),
                "estimator_skipped_steps": None if self.estimator_path is None else
                [s for s, skip in enumerate(self.estimator_path) if skip]}


def greedy_oracle(pipe: Any, prompt: str, steps: int = 50, seed: int = 0, guidance: float = 5.0,
                  tolerance: float | None = 0.02, max_skips: int = 4, first: int = MIN_WARMUP,
                  estimator: AdaptiveSkipConfig | None = None, **kwargs: Any) -> OracleResult:
    """Greedy search of the skip path of ``prompt`` whose final latent stays within ``tolerance``.

    For ``j = first .. steps-1`` (passing over ``j`` when the ``max_skips`` steps before it are
    already skipped), run the pipeline with the accepted skips plus ``j`` and keep ``j`` when the
    relative L2 error of the final latent against the full-step run is ``<= tolerance``.

    With ``estimator`` given, the Skip hook also runs with that config on the same prompt and seed
    and its path and error are attached. ``tolerance=None`` then gives the oracle the estimator's
    own error as its budget, so the two paths are compared at equal final error: the question
    becomes "with the error the estimator spent, which steps would a search have skipped?".
    ``pipe`` is used with whatever scheduler it holds; extra ``kwargs`` go to every pipeline call.
    Skip must not be enabled on ``pipe``.
    """
    if tolerance is None and estimator is None:
        raise StepsaverError("tolerance=None means 'the estimator's own error': pass estimator=AdaptiveSkipConfig()")
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or not tolerance >= 0):
        raise StepsaverError(f"oracle tolerance must be a number >= 0 (relative L2 of the final latent), "
                             f"got {tolerance!r}")
    if isinstance(max_skips, bool) or not isinstance(max_skips, int) or max_skips < 0:
        raise StepsaverError(f"max_skips must be an integer >= 0, got {max_skips!r}")
    if isinstance(first, bool) or not isinstance(first, int) or first < 1:
        raise StepsaverError(f"first must be a step >= 1 (step 0 has no output to reuse), got {first!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise StepsaverError(f"steps must be an integer >= 1, got {steps!r}")
    t0 = time.perf_counter()
    with forced_skips(pipe) as hook:
        hook.plan()
        reference = _final_latent(pipe, prompt, steps, seed, guidance, **kwargs)
        accepted, runs = hook.record, hook.network_runs
    estimator_path = estimator_error = None
    if estimator is not None:
        enable_adaptive_skip(pipe, estimator)
        try:
            latent = _final_latent(pipe, prompt, steps, seed, guidance, **kwargs)
            report = skip_report(pipe)
        finally:
            disable_adaptive_skip(pipe)
            pipe.__dict__.pop("adaptive_skip_report", None)
        estimator_path = report.path(0) if report is not None else [False] * steps
        estimator_error = relative_l2(latent, reference)
    budget = float(estimator_error if tolerance is None else tolerance)
    path = [False] * steps
    errors: list[float | None] = [None] * steps
    trials, final_error = 0, 0.0
    with forced_skips(pipe) as hook:
        for j in range(first, steps):
            if consecutive_skips(path[:j]) >= max_skips:
                continue
            hook.plan([s for s in range(j) if path[s]] + [j], replay=accepted, replay_before=j)
            latent = _final_latent(pipe, prompt, steps, seed, guidance, **kwargs)
            runs += hook.network_runs
            trials += 1
            errors[j] = relative_l2(latent, reference)
            if errors[j] <= budget:
                path[j] = True
                accepted, final_error = hook.record, errors[j]
    return OracleResult(prompt=prompt, steps=steps, seed=seed, guidance=guidance,
                        scheduler=type(pipe.scheduler).__name__, tolerance=budget, max_skips=max_skips, first=first,
                        path=path, errors=errors, final_error=final_error, trials=trials, network_runs=runs,
                        seconds=time.perf_counter() - t0, estimator_path=estimator_path,
                        estimator_error=estimator_error,
                        estimator_config={} if estimator is None else asdict(estimator))


# --- agreement between paths (pure) -------------------------------------------------------------

def _check_paths(a: Sequence[bool], b: Sequence[bool], start: int) -> None:
    if len(a) != len(b):
        raise ValueError(f"paths differ in length: {len(a)} vs {len(b)}")
    if not 0 <= start < len(a):
        raise ValueError(f"start {start} is outside the {len(a)} positions")


def path_agreement(a: Sequence[bool], b: Sequence[bool], start: int = MIN_WARMUP) -> float:
    """Share of positions ``start..`` where two skip paths agree (1.0 = identical decisions)."""
    _check_paths(a, b, start)
    same = sum(bool(x) == bool(y) for x, y in zip(a[start:], b[start:], strict=True))
    return same / (len(a) - start)


def position_agreement(paths_a: Sequence[Sequence[bool]], paths_b: Sequence[Sequence[bool]],
                       start: int = MIN_WARMUP) -> dict[str, Any]:
    """Per-position agreement over prompts, and the 2x2 confusion of the decisions.

    ``paths_a[k]`` and ``paths_b[k]`` are the two paths of prompt ``k`` (e.g. oracle, estimator).
    Returns ``per_position`` (agreement rate at each step ``start..``, over prompts), ``overall``
    (over all prompts and positions) and ``confusion`` counts: ``both_skip``, ``only_a``,
    ``only_b``, ``both_compute``.
    """
    if len(paths_a) != len(paths_b) or not paths_a:
        raise ValueError(f"need the same positive number of paths on both sides, got {len(paths_a)} and {len(paths_b)}")
    for a, b in zip(paths_a, paths_b, strict=True):
        _check_paths(a, b, start)
        if len(a) != len(paths_a[0]):
            raise ValueError("all paths must have the same number of steps")
    steps = len(paths_a[0])
    per_position = [sum(bool(a[s]) == bool(b[s]) for a, b in zip(paths_a, paths_b, strict=True)) / len(paths_a)
                    for s in range(start, steps)]
    pairs = [(bool(a[s]), bool(b[s])) for a, b in zip(paths_a, paths_b, strict=True) for s in range(start, steps)]
    confusion = {"both_skip": pairs.count((True, True)), "only_a": pairs.count((True, False)),
                 "only_b": pairs.count((False, True)), "both_compute": pairs.count((False, False))}
    overall = (confusion["both_skip"] + confusion["both_compute"]) / len(pairs)
    return {"start": start, "per_position": per_position, "overall": overall, "confusion": confusion}


def skip_position_chi2(paths_a: Sequence[Sequence[bool]], paths_b: Sequence[Sequence[bool]],
                       start: int = MIN_WARMUP) -> dict[str, Any]:
    """Chi-squared test of homogeneity of where two sets of paths skip (the paper's Fig. 4 test).

    Builds the 2 x K table of skip counts per position (row a, row b; positions ``start..``
    where either side skipped at least once) and runs ``scipy.stats.chi2_contingency`` (no Yates
    correction). A large p-value means the two skip-position distributions are not
    distinguishable; ``min_expected`` is the smallest expected count (below about 5 the
    chi-squared approximation is rough, as it is with few prompts over 46 positions).

    Degenerate tables are answered without scipy: no skips on either side gives statistic 0 and
    p = 1 (identical, empty), as do skips at a single common position; skips on one side only
    give ``nan`` (no distribution to compare). ``reason`` says which case applied.
    """
    if len(paths_a) != len(paths_b) or not paths_a:
        raise ValueError(f"need the same positive number of paths on both sides, got {len(paths_a)} and {len(paths_b)}")
    steps = len(paths_a[0])
    for p in (*paths_a, *paths_b):
        if len(p) != steps:
            raise ValueError("all paths must have the same number of steps")
    if not 0 <= start < steps:
        raise ValueError(f"start {start} is outside the {steps} positions")
    counts_a = [sum(bool(p[s]) for p in paths_a) for s in range(start, steps)]
    counts_b = [sum(bool(p[s]) for p in paths_b) for s in range(start, steps)]
    keep = [k for k in range(len(counts_a)) if counts_a[k] + counts_b[k] > 0]
    table = [[counts_a[k] for k in keep], [counts_b[k] for k in keep]]
    result: dict[str, Any] = {"positions": [start + k for k in keep], "counts_a": table[0], "counts_b": table[1],
                              "total_a": sum(counts_a), "total_b": sum(counts_b)}
    if not keep:
        return {**result, "statistic": 0.0, "p_value": 1.0, "dof": 0, "reason": "no skips on either side"}
    if sum(table[0]) == 0 or sum(table[1]) == 0:
        return {**result, "statistic": math.nan, "p_value": math.nan, "dof": 0,
                "reason": "only one side skips; there is no distribution to compare"}
    if len(keep) == 1:
        return {**result, "statistic": 0.0, "p_value": 1.0, "dof": 0,
                "reason": "both sides skip only at one position"}
    from scipy.stats import chi2_contingency

    stat, p, dof, expected = chi2_contingency(table, correction=False)
    return {**result, "statistic": float(stat), "p_value": float(p), "dof": int(dof), "reason": "",
            "min_expected": float(expected.min())}
