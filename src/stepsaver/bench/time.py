"""``stepsaver bench time``: generation time vs steps with a linear fit (StepSaver's Fig. 5).

StepSaver's saving argument rests on time being linear in steps (a fixed cost for text encoding
and VAE decoding plus a constant cost per denoiser call). This measures it on a pipeline: median
of repeats per step count after a warm-up, a least-squares line, R^2, a plot and a report.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def linear_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Least-squares ``y = slope * x + intercept`` and its coefficient of determination R^2."""
    xa, ya = np.asarray(x, float), np.asarray(y, float)
    if len(xa) < 2 or len(xa) != len(ya):
        raise ValueError("need at least two (x, y) pairs of equal length")
    slope, intercept = np.polyfit(xa, ya, 1)
    residual = ((ya - (slope * xa + intercept)) ** 2).sum()
    total = ((ya - ya.mean()) ** 2).sum()
    return {"slope": float(slope), "intercept": float(intercept),
            "r2": float(1.0 - residual / total) if total > 0 else 1.0}


def bench_time(pipe, steps: Sequence[int] = tuple(range(10, 101, 10)), repeats: int = 3,
               prompt: str = "a large apple on a blue background", out_dir: str | Path = "docs/results",
               name: str = "time-vs-steps") -> dict:
    """Time ``pipe`` at each step count, fit a line, write JSON + markdown + PNG under ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stepsaver.generation import generate
    from stepsaver.measure.report import write_report

    generate(pipe, prompt, steps=min(steps))  # warm-up: first call pays allocation and lazy init
    rows = []
    for n in steps:
        times = [generate(pipe, prompt, steps=n, seed=r).seconds for r in range(repeats)]
        rows.append({"steps": n, "median_s": float(np.median(times)), "min_s": min(times), "max_s": max(times)})
    fit = linear_fit([r["steps"] for r in rows], [r["median_s"] for r in rows])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    xs = np.array([r["steps"] for r in rows])
    ax.plot(xs, [r["median_s"] for r in rows], "o", label="median of repeats")
    ax.plot(xs, fit["slope"] * xs + fit["intercept"], "-",
            label=f"{fit['slope'] * 1e3:.1f} ms/step + {fit['intercept']:.3f} s, R²={fit['r2']:.4f}")
    ax.set_xlabel("denoising steps")
    ax.set_ylabel("seconds per image")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = out / f"{name}.png"
    fig.savefig(png)
    plt.close(fig)
    summary = (f"Generation time is linear in steps: {fit['slope'] * 1e3:.2f} ms per step plus "
               f"{fit['intercept']:.3f} s fixed, R^2 = {fit['r2']:.4f} ({repeats} repeats per point, medians).")
    paths = write_report(name, rows, title="Generation time vs steps", summary=summary, plots=[png],
                         extra={"fit": fit, "prompt": prompt, "repeats": repeats}, out_dir=out)
    return {"fit": fit, "rows": rows, **{k: str(v) for k, v in paths.items()}, "plot": str(png)}
