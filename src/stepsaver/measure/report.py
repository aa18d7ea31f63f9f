"""The report writer every benchmark shares: JSON + markdown table + plots under docs/results/.

A result is only worth as much as its context, so every JSON carries the machine (CPU, GPU,
memory), the library versions and the exact command line next to the numbers. Differences in
FID between two methods come with a bootstrap 95% confidence interval
(:func:`bootstrap_fid_difference`): images resampled independently, or whole prompts
when both methods rendered the same prompts (``paired=True``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS_DIR = Path("docs/results")


def machine_info() -> dict[str, Any]:
    """Where a benchmark ran: what a reader needs to compare its timings with theirs."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "platform": platform.platform(), "python": sys.version.split()[0]}
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    versions = {}
    for pkg in ("torch", "diffusers", "transformers", "torchmetrics", "stepsaver"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    info["versions"] = versions
    return info


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    cols = list(columns or dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_report(name: str, rows: Sequence[dict[str, Any]], *, title: str, summary: str = "",
                 extra: dict[str, Any] | None = None, plots: Sequence[str | Path] = (),
                 out_dir: str | Path = RESULTS_DIR, columns: Sequence[str] | None = None) -> dict[str, Path]:
    """Write ``<name>.json`` and ``<name>.md`` (the table, the summary, the plots, the machine)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    payload = {"name": name, "title": title, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join(sys.argv), "machine": machine, "rows": list(rows), **(extra or {})}
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2, default=str))
    md = [f"# {title}", "", summary, "", markdown_table(rows, columns), ""]
    for p in plots:
        md.append(f"![{Path(p).stem}]({Path(p).name})")
        md.append("")
    md.append(f"Machine: {machine['cpu']}, {machine['cores']} cores"
              + (f", GPU {machine['gpu']}" if "gpu" in machine else "")
              + f"; torch {machine['versions'].get('torch')}, diffusers {machine['versions'].get('diffusers')}.")
    md.append(f"Command: `{payload['command']}` ({payload['date']}).")
    md_path = out / f"{name}.md"
    md_path.write_text("\n".join(md) + "\n")
    return {"json": json_path, "md": md_path}


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plot(fig, path: str | Path, dpi: int = 120) -> Path:
    """Lay out, write and close a benchmark figure; returns its path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = feats.double()
    return f.mean(0), torch.cov(f.T)


def frechet_distance_from_rows(real: torch.Tensor, fake: torch.Tensor) -> float:
    """The Frechet distance torchmetrics' FID computes, from the feature rows themselves.

    FID needs ``tr sqrt(S_f S_r)``; torchmetrics takes the eigenvalues of the d x d product
    (d = 2048 for Inception). With centred rows ``X`` (n x d), ``S = X^T X / (n - 1)``, and the
    non-zero eigenvalues of ``S_f S_r`` are the squared singular values of ``X_f X_r^T`` divided
    by ``(n_f - 1)(n_r - 1)``. So the trace term is the nuclear norm of an n_f x n_r matrix: the
    same number, about 30x faster when there are fewer images than feature dimensions, which
    is what makes hundreds of bootstrap replicates affordable on a CPU.
    """
    real, fake = real.double(), fake.double()
    mr, mf = real.mean(0), fake.mean(0)
    xr, xf = real - mr, fake - mf
    cr, cf = len(xr) - 1, len(xf) - 1
    mean_term = (mr - mf).square().sum()
    trace_term = xr.square().sum() / cr + xf.square().sum() / cf
    cross = torch.linalg.matrix_norm(xf @ xr.T, ord="nuc") / (cr * cf) ** 0.5
    return float(mean_term + trace_term - 2 * cross)


def bootstrap_fid_difference(real: torch.Tensor, fake_a: torch.Tensor, fake_b: torch.Tensor,
                             n_boot: int = 100, seed: int = 0, paired: bool = False) -> dict[str, float]:
    """FID(a) - FID(b) with a bootstrap 95% CI.

    Inputs are Inception features (see :func:`stepsaver.measure.fid.features`). Each replicate
    computes the Frechet distance on resampled rows, from the rows themselves when there are
    fewer rows than feature dimensions (:func:`frechet_distance_from_rows`, a tenth of a second)
    and with torchmetrics' formula otherwise (a d x d eigen-decomposition, seconds). The point
    estimate follows the same rule (as :func:`stepsaver.measure.fid.fid_from_features` does). A
    CI that excludes 0 means the two methods differ at this sample size.

    ``paired=False`` resamples the real set and both fake sets independently: right for sets
    of unrelated images. ``paired=True`` is for row-aligned sets, where row ``i`` of ``real``,
    ``fake_a`` and ``fake_b`` all belong to prompt ``i`` (two ways of rendering the same prompts
    from the same noise): the prompt is the unit, so one index draw resamples all three rows
    together. Independent draws would add the prompt-to-prompt variation that both methods
    share to the difference and make the CI several times wider than the comparison warrants.
    """
    from torchmetrics.image.fid import _compute_fid

    if paired and not len(real) == len(fake_a) == len(fake_b):
        raise ValueError(f"paired bootstrap needs row-aligned sets, got {len(real)} real, {len(fake_a)} a, "
                         f"{len(fake_b)} b rows; use paired=False for unrelated sets")

    def fid(r: torch.Tensor, f: torch.Tensor) -> float:
        return float(_compute_fid(*_stats(f), *_stats(r)))

    rng = np.random.default_rng(seed)
    # the same number (tested), without the d x d eigen-decomposition when n < d
    rep = frechet_distance_from_rows if max(len(real), len(fake_a), len(fake_b)) < real.shape[1] else fid
    point = rep(real, fake_a) - rep(real, fake_b)
    diffs = []
    for _ in range(n_boot):
        if paired:
            i = rng.integers(0, len(real), len(real))
            r, a, b = real[i], fake_a[i], fake_b[i]
        else:
            r = real[rng.integers(0, len(real), len(real))]
            a = fake_a[rng.integers(0, len(fake_a), len(fake_a))]
            b = fake_b[rng.integers(0, len(fake_b), len(fake_b))]
        diffs.append(rep(r, a) - rep(r, b))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"fid_diff": point, "ci_low": float(lo), "ci_high": float(hi), "n_boot": n_boot, "paired": paired}
