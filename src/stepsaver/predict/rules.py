"""StepSaver's labelling rules as pure functions over similarity sequences.

A prompt is rendered at an increasing grid of step counts ``N_0 < N_1 < ... < N_m`` from the
same initial noise. Two rules turn those renders into "the fewest steps that suffice":

* :func:`first_decline` is the paper's: with ``s_k = SSIM(img(N_k), img(N_k+1))`` the label is
  ``N_k`` for the first ``k >= 1`` with ``s_k < s_(k-1)``: the first image of the pair whose
  similarity dropped. Rising similarity means the renders are still settling, so a sequence
  that never declines is labelled with the largest step count (nothing told us to stop early).
* :func:`converged` is ours: the fewest steps whose render is within ``tau`` (SSIM) of the
  render at the largest step count, the best image the grid can make. It asks the question a
  user cares about ("how close to the expensive image am I?") instead of reading a signal into
  the shape of a noisy curve.
"""

from __future__ import annotations

from collections.abc import Sequence

from stepsaver.errors import StepsaverError

DEFAULT_TAU = 0.99  # on the embedded model 0.98-0.99 spreads labels over 10-40 steps; bench flexi checks it


def check_grid(steps: Sequence[int], at_least: int = 2) -> tuple[int, ...]:
    """Validate a step grid: at least ``at_least`` (two for labels) positive, strictly increasing integers."""
    grid = tuple(int(s) for s in steps)
    if len(grid) < at_least:
        raise StepsaverError(f"a step grid needs at least {at_least} step count(s), got {list(grid)}")
    if any(s <= 0 for s in grid):
        raise StepsaverError(f"step counts must be positive, got {list(grid)}")
    if any(b <= a for a, b in zip(grid, grid[1:], strict=False)):
        raise StepsaverError(f"step counts must be strictly increasing, got {list(grid)}; e.g. 10:100:10")
    return grid


def first_decline(steps: Sequence[int], next_ssim: Sequence[float]) -> int:
    """The paper's label: ``steps[k]`` at the first ``k >= 1`` with ``s_k < s_(k-1)``.

    ``next_ssim[k]`` is the SSIM between the renders at ``steps[k]`` and ``steps[k+1]``, so it
    has one entry fewer than ``steps``. Ties are not declines. No decline -> ``steps[-1]``.
    """
    grid = check_grid(steps)
    if len(next_ssim) != len(grid) - 1:
        raise StepsaverError(f"need {len(grid) - 1} consecutive similarities for {len(grid)} step counts, "
                             f"got {len(next_ssim)}")
    for k in range(1, len(next_ssim)):
        if next_ssim[k] < next_ssim[k - 1]:
            return grid[k]
    return grid[-1]


def converged(steps: Sequence[int], ref_ssim: Sequence[float], tau: float = DEFAULT_TAU) -> int:
    """Our label: the fewest ``steps[k]`` with ``ref_ssim[k] >= tau``.

    ``ref_ssim[k]`` is the SSIM between the render at ``steps[k]`` and the one at ``steps[-1]``
    (the last entry, the render with itself, counts as 1 whatever is stored), so the answer
    always exists.
    """
    grid = check_grid(steps)
    if len(ref_ssim) != len(grid):
        raise StepsaverError(f"need {len(grid)} reference similarities for {len(grid)} step counts, "
                             f"got {len(ref_ssim)}")
    if not 0.0 < tau <= 1.0:
        raise StepsaverError(f"tau must be in (0, 1], got {tau}")
    for k, s in enumerate(ref_ssim[:-1]):
        if s >= tau:
            return grid[k]
    return grid[-1]


RULES = {"first-decline": "first_decline", "converged": "converged"}


def apply_rule(rule: str, steps: Sequence[int], next_ssim: Sequence[float], ref_ssim: Sequence[float],
               tau: float = DEFAULT_TAU) -> int:
    """Label by rule name (``first-decline`` or ``converged``), as the CLI names them."""
    if rule == "first-decline":
        return first_decline(steps, next_ssim)
    if rule == "converged":
        return converged(steps, ref_ssim, tau)
    raise StepsaverError(f"unknown labelling rule {rule!r}; choose one of {', '.join(RULES)}")
