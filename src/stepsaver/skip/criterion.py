"""AdaptiveDiffusion's skip criterion as pure functions over the history of latent differences.

Notation (issue 4, from the paper and its official code). ``L_j`` is the latent after scheduler
step ``j`` (``j = 0, 1, ...``) and ``D_j = mean(|L_j - L_{j-1}|)`` for ``j >= 1``; like the
official code, the history starts at ``L_0`` (the initial noise is not used). After step ``j``
the *next* step ``j + 1`` reuses the previous raw denoiser output (the scheduler still steps)
when the third-order estimate says the trajectory is locally straight::

    |(D_j + D_{j-2}) / 2 - D_{j-1}| <= delta * D_{j-1}

The first three differences exist after step 3, so steps ``0 .. warmup-1`` (``warmup >= 4``)
always run the denoiser, and no more than ``max_skips`` consecutive steps are skipped.

Histories are passed as two sequences: ``diffs = [D_1, ..., D_j]`` (``j`` values after step
``j``) and ``path = [p_0, ..., p_j]``, the skip flags of steps ``0 .. j`` (``True`` = that step
reused the cached output). Every ``next_*`` function returns the flag for step ``j + 1``.

Two conventions of ours, both documented where they act:

* ``delta = 0`` never skips (the inequality would otherwise hold on exact ties only, e.g. when
  the latent stops moving), so a zero threshold reproduces the unaccelerated sampler bit for bit.
* Arithmetic is whatever the inputs carry: Python floats (float64) in :func:`next_step_skipped`,
  float64 tensors in :func:`next_step_skipped_batched`, the latents' own dtype (0-dim tensors)
  when the hook runs in compat mode.

:func:`official_next_step_skipped` reproduces the decision of the official implementation,
quirks included; see its docstring.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from stepsaver.skip.config import MIN_WARMUP, AdaptiveSkipConfig

__all__ = [
    "MIN_WARMUP",
    "consecutive_skips",
    "is_flat",
    "latent_difference",
    "next_step_skipped",
    "next_step_skipped_batched",
    "official_next_step_skipped",
    "skip_path",
]

DEFAULT = AdaptiveSkipConfig(rule="criterion")  # the criterion's own defaults (delta, C_max)


def latent_difference(current: torch.Tensor, previous: torch.Tensor, per_sample: bool = True) -> torch.Tensor:
    """``D = mean(|current - previous|)``: one float32 value per sample (shape ``[B]``) or a 0-dim total."""
    diff = (current.float() - previous.float()).abs()
    if per_sample:
        return diff.flatten(1).mean(dim=1) if diff.ndim > 1 else diff
    return diff.mean()


def is_flat(d_prev2: Any, d_prev: Any, d_cur: Any, threshold: Any) -> Any:
    """The third-order test ``|(D_j + D_{j-2}) / 2 - D_{j-1}| <= delta * D_{j-1}``.

    Written with plain operators in the official order of operations, so it works unchanged on
    floats (returns ``bool``), 0-dim tensors and ``[B]`` tensors (return a bool tensor).
    """
    return abs((d_cur + d_prev2) / 2 - d_prev) <= d_prev * threshold


def consecutive_skips(path: Sequence[bool]) -> int:
    """How many steps at the end of ``path`` were skipped in a row."""
    count = 0
    for skipped in reversed(path):
        if not skipped:
            break
        count += 1
    return count


def _check(diffs: Sequence[Any], path: Sequence[Any], threshold: float, max_skips: int, warmup: int) -> None:
    if len(path) != len(diffs) + 1:
        raise ValueError(f"path must hold one flag per step 0..j and diffs D_1..D_j; got {len(path)} flags "
                         f"and {len(diffs)} differences")
    if threshold < 0 or max_skips < 0 or warmup < MIN_WARMUP:
        raise ValueError(f"need threshold >= 0, max_skips >= 0, warmup >= {MIN_WARMUP}; "
                         f"got {threshold}, {max_skips}, {warmup}")


def next_step_skipped(diffs: Sequence[float], path: Sequence[bool], threshold: float = DEFAULT.threshold,
                      max_skips: int = DEFAULT.max_skips,
                      warmup: int = MIN_WARMUP) -> bool:
    """Whether step ``j + 1`` reuses the cached denoiser output (one trajectory).

    ``diffs = [D_1..D_j]``, ``path = [p_0..p_j]``. Steps below ``warmup`` always compute; after
    ``max_skips`` skips in a row the next step computes; ``threshold == 0`` never skips.
    """
    _check(diffs, path, threshold, max_skips, warmup)
    if len(path) < warmup or threshold == 0 or consecutive_skips(path) >= max_skips:
        return False
    return bool(is_flat(diffs[-3], diffs[-2], diffs[-1], threshold))


def next_step_skipped_batched(diffs: torch.Tensor, path: torch.Tensor, threshold: float = DEFAULT.threshold,
                              max_skips: int = DEFAULT.max_skips, warmup: int = MIN_WARMUP) -> torch.Tensor:
    """Per-sample version: ``diffs`` is ``[j, B]``, ``path`` is a ``[j + 1, B]`` bool tensor.

    Returns a ``[B]`` bool tensor, element ``i`` equal to :func:`next_step_skipped` on column ``i``
    (use float64 ``diffs`` to match the float version bit for bit).
    """
    if diffs.ndim != 2 or path.ndim != 2 or diffs.shape[1] != path.shape[1]:
        raise ValueError(f"diffs must be [j, B] and path [j + 1, B]; got {tuple(diffs.shape)} and {tuple(path.shape)}")
    _check(range(diffs.shape[0]), range(path.shape[0]), threshold, max_skips, warmup)
    batch = path.shape[1]
    if path.shape[0] < warmup or threshold == 0:
        return torch.zeros(batch, dtype=torch.bool, device=path.device)
    run = torch.flip(path.bool(), dims=[0]).long().cumprod(dim=0).sum(dim=0)  # trailing skips per sample
    flat = is_flat(diffs[-3], diffs[-2], diffs[-1], threshold)
    return flat & (run < max_skips)


def official_next_step_skipped(diffs: Sequence[Any], path: Sequence[bool], threshold: float = DEFAULT.threshold,
                               max_skips: int = DEFAULT.max_skips) -> bool:
    """The official code's decision (``estimate_skipping``), restated over ``diffs`` and ``path``.

    What it reproduces, from the official pipelines' loop (and the issue text):

    * one decision per call of ``scheduler.step`` for the whole batch (``D`` is the mean over the
      whole latent tensor; the hook feeds it that way in compat mode); warmup fixed at 4 steps;
    * its C_max check ``len(mask) > 4 and not any(mask[-max_skips:])`` (``mask`` = compute flags of
      the steps decided so far, i.e. ``not p`` for ``p`` in ``path[4:]``) runs *before* the
      criterion but only once five decisions exist, so C_max is enforced from the sixth decision
      on: with ``max_skips=4`` the first five decided steps may all be skipped;
    * Python's ``mask[-0:]`` is the whole list, so ``max_skips=0`` forces a compute only when every
      decided step so far was skipped;
    * no special case for ``threshold == 0``: exact ties skip.
    """
    if len(path) != len(diffs) + 1:
        raise ValueError(f"path must hold one flag per step 0..j and diffs D_1..D_j; got {len(path)} flags "
                         f"and {len(diffs)} differences")
    if len(path) < MIN_WARMUP:
        return False
    decided = list(path[MIN_WARMUP:])
    if len(decided) > 4 and all(decided[-max_skips:]):
        return False
    return bool(is_flat(diffs[-3], diffs[-2], diffs[-1], threshold))


def skip_path(diffs: Sequence[float], num_steps: int, threshold: float = DEFAULT.threshold,
              max_skips: int = DEFAULT.max_skips,
              warmup: int = MIN_WARMUP, compat: bool = False) -> list[bool]:
    """Replay the decisions of a run: the skip flags of steps ``0 .. num_steps-1`` given its ``D_1, D_2, ...``.

    The differences a run observes depend on what it skipped, but each decision depends only on
    the differences and decisions before it, so replaying a run's own ``diffs`` gives its path.
    Needs ``len(diffs) >= num_steps - 2`` (``D_{N-1}`` is never used).
    """
    if len(diffs) < num_steps - 2:
        raise ValueError(f"{num_steps} steps need at least {num_steps - 2} differences, got {len(diffs)}")
    path: list[bool] = []
    while len(path) < num_steps:
        if not path:
            path.append(False)
            continue
        j = len(path) - 1
        if compat:
            path.append(official_next_step_skipped(diffs[:j], path, threshold, max_skips))
        else:
            path.append(next_step_skipped(diffs[:j], path, threshold, max_skips, warmup))
    return path
