"""The calibration report: the frontier table, the held-out check, and a Pareto plot per run.

Written next to the config by ``stepsaver calibrate --report PREFIX`` and as
docs/results/calibrate.{md,json,png} by ``stepsaver bench calibrate`` (several runs, one file).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stepsaver.calibrate.search import CalibrationResult

__all__ = ["COLUMNS", "plot_frontiers", "write_calibration_report"]

COLUMNS = ["run", "setting", "family", "n", "denoiser_calls", "cost", "seconds_per_image", "lpips", "psnr_db",
           "ssim", "statistic", "interval", "holds", "confident", "speedup_calls"]
_COLOURS = {"steps": "tab:blue", "skip": "tab:orange", "recommender": "tab:green", "cache": "tab:purple",
            "scheduler": "tab:brown", "combined": "tab:red", "reference": "black"}


def plot_frontiers(results: Sequence[tuple[str, CalibrationResult]], path: str | Path) -> Path:
    """Cost (denoiser calls per image) vs the tolerance metric on the calibration prompts, one panel a run."""
    from stepsaver.measure.report import pyplot, save_plot

    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.2), squeeze=False)
    for ax, (name, res) in zip(axes[0], results, strict=True):
        metric = res.summary["tolerance"].split("<")[0].split(">")[0]
        key = {"psnr": "psnr_db"}.get(metric, metric)
        for family, colour in _COLOURS.items():
            pts = [r for r in res.calibration_rows if r["family"] == family]
            if pts:
                ax.scatter([r["cost"] for r in pts], [r[key] for r in pts], s=18, c=colour, label=family, alpha=0.8)
        front = sorted(res.frontier, key=lambda r: r["cost"])
        ax.plot([r["cost"] for r in front], [r[key] for r in front], c="grey", lw=1, ls="--", label="frontier")
        if res.config is not None:
            chosen = res.config.calibration
            ax.scatter([chosen["cost"]], [chosen[key]], marker="*", s=220, c="gold", edgecolors="black",
                       zorder=5, label="chosen")
        bound = float(res.summary["tolerance"].split("=")[1].split()[0])
        if " for " not in res.summary["tolerance"]:
            ax.axhline(bound, c="black", lw=0.8, ls=":", label=f"tolerance {res.summary['tolerance']}")
        ax.set_xlabel("denoiser calls per image (cost)")
        ax.set_ylabel(f"mean {metric} vs reference")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7)
    return save_plot(fig, path)


def _summary_md(name: str, res: CalibrationResult) -> str:
    s = res.summary
    verdict = ("holds with confidence" if s["heldout_holds_with_confidence"] else
               "holds (point estimate only)" if s["heldout_holds"] else "does NOT hold")
    lines = [f"### {name}", "",
             f"- tolerance **{s['tolerance']}** against {s['reference']['steps']} steps "
             f"({s['reference']['scheduler']}); {s['prompts']} prompts: {s['calibration_prompts']} calibration, "
             f"{s['heldout_prompts']} held out, {s['screen_prompts']} screen",
             f"- chosen: **{s['chosen']}**; on held-out prompts {s['tolerance'].split()[0]} statistic "
             f"{s['heldout_statistic']} (95% interval {s['heldout_interval']}): "
             f"{verdict}",
             f"- speedup vs the reference: {s['speedup_calls']}x fewer denoiser calls, "
             f"{s['speedup_seconds']}x wall-clock",
             f"- best single knob on the held-out prompts: {s['best_single_knob']}"
             + ("" if s["vs_best_single_knob"] is None else
                f"; the chosen setting costs {s['vs_best_single_knob']}x less than it"
                + (" (no better: the combination did not pay)" if s["vs_best_single_knob"] <= 1.0 else "")),
             f"- search: {s['candidates']} candidates, {s['screened']} screened, {s['calibrated']} on all "
             f"calibration prompts, {s['renders_made']} images rendered; {s['wall_minutes']} min wall, "
             f"{s['cpu_minutes']} CPU min" + (" (time budget ran out)" if s["out_of_time"] else "")]
    if s.get("selection_critical") is not None:
        lines.append(f"- winner's curse: {s['compared_on_all_calibration_prompts']} settings compared on all "
                     f"calibration prompts, so a passing setting must be expected to hold on the held-out part "
                     f"from {s['selection_critical']} standard errors worse than its calibration estimate "
                     "(their simultaneous 97.5% bound, max-t bootstrap)")
    if s.get("predictability_note"):
        lines.append(f"- Predict on this model: {s['predictability_note']}")
    lines.append("")
    return "\n".join(lines)


def write_calibration_report(results: Sequence[tuple[str, CalibrationResult]], name: str = "calibrate",
                             out_dir: str | Path = "docs/results", title: str = "Calibrate",
                             preamble: str = "") -> dict[str, Path]:
    """``<name>.{md,json,png}``: every run's summary, frontier and held-out rows, and the Pareto plots."""
    from stepsaver.measure.report import write_report

    out = Path(out_dir)
    plot = plot_frontiers(results, out / f"{name}.png")
    rows: list[dict[str, Any]] = []
    for run, res in results:
        rows += [dict(r, run=run, role="frontier") for r in res.frontier]
        rows += [dict(r, run=run) for r in res.heldout.get("rows", [])]
    summary = preamble + "\n".join(_summary_md(run, res) for run, res in results) + \
        "\nRows: each run's Pareto frontier on the calibration prompts, then its held-out rows (chosen, and " \
        "each single knob's cheapest setting that holds with confidence on the held-out prompts).\n"
    extra = {"runs": {run: res.to_dict() for run, res in results}}
    paths = write_report(name, rows, title=title, summary=summary, extra=extra, plots=[plot], out_dir=out,
                         columns=["run", "role", *COLUMNS[1:]])
    return {**paths, "png": plot}
