"""``stepsaver bench recipe``: DeciDiffusion's claim, reproduced small.

DeciDiffusion says 30 steps of its recipe match 50 of SD's. Here both recipes train the same
UNet on the same scenes for the same steps and batch (identical compute: the only differences
are the noise schedule, the parametrisation, the loss weights, the timestep spacing and when
the EMA runs, see :mod:`stepsaver.shrink.recipe`), then each model generates the same held-out
scene prompts at 10, 20, 30, 40 and 50 DDIM steps (same seed), scored by FID against the real
scenes of those captions and by prompt adherence. Target: the Deci recipe reaches the
baseline's 50-step FID in >= 40% fewer steps. Training is resumable; pass trained pipelines to
skip it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from stepsaver.bench.heldout import heldout_set, render_set
from stepsaver.errors import StepsaverError
from stepsaver.shrink.train import TrainConfig, train_model

STEP_GRID = (10, 20, 30, 40, 50)
TARGET_FEWER = 0.40


def steps_to_match(fids: dict[int, float], target: float) -> int | None:
    """Fewest grid steps whose FID is <= ``target`` (None: never)."""
    hits = [s for s in sorted(fids) if fids[s] <= target]
    return hits[0] if hits else None


def bench_recipe(base: TrainConfig, *, work: str | Path = "runs/recipe", pipelines: dict[str, str] | None = None,
                 n: int = 500, grid: Sequence[int] = STEP_GRID, seed: int = 0, guidance: float = 5.0,
                 batch: int = 32, scene_seed: int = 2, out_dir: str | Path = "docs/results", name: str = "recipe",
                 progress: bool = True, max_minutes: float | None = None, n_boot: int = 100) -> dict[str, Any]:
    """Train (or load) both recipes at identical compute, evaluate on held-out prompts, report.

    ``n_boot`` bootstrap replicates cost two 2048-d FIDs each (~2 s on this CPU): a toy run wants few.
    """
    from stepsaver.measure.report import bootstrap_fid_difference, pyplot, save_plot, write_report

    plt = pyplot()

    from stepsaver.measure.adherence import AdherenceScorer
    from stepsaver.measure.fid import features, fid_from_features
    from stepsaver.pipelines import load_pipeline

    if n < 2:
        raise StepsaverError(f"--n must be >= 2 (FID needs a set), got {n}")
    work = Path(work)
    pipelines = dict(pipelines or {})
    trained: dict[str, dict] = {}
    for recipe in ("deci", "sd"):
        if recipe in pipelines:
            continue
        cfg = replace(base, recipe=recipe, out=str(work / recipe))
        summary = train_model(cfg, resume=True, progress=progress, max_minutes=max_minutes)
        if not summary.get("finished"):
            raise StepsaverError(f"{recipe} training stopped at step {summary['steps']} of {cfg.steps} "
                                 "(--max-minutes); run the same command again to continue")
        trained[recipe] = {k: v for k, v in summary.items() if k != "history"}
        pipelines[recipe] = summary["pipeline"]
    scenes, prompts, real, real_f = heldout_set(n, scene_seed)
    scorer = AdherenceScorer.load()
    rows, fids, feats = [], {}, {}
    for recipe in ("deci", "sd"):
        pipe = load_pipeline(pipelines[recipe], scheduler="ddim", device="auto")
        for steps in grid:
            images = render_set(pipe, prompts, steps, batch, seed, guidance)
            f = features(images)
            feats[(recipe, steps)] = f
            fid = fid_from_features(real_f, f)
            fids[(recipe, steps)] = fid
            rows.append({"recipe": recipe, "steps": steps, "fid": fid,
                         "adherence": float(scorer.score(images, prompts).adherence.mean())})
            if progress:
                print(f"{recipe} {steps} steps: FID {fid:.2f}", flush=True)
    last = max(grid)
    target = fids[("sd", last)]
    match = steps_to_match({s: fids[("deci", s)] for s in grid}, target)
    met = match is not None and match <= (1 - TARGET_FEWER) * last
    ci = bootstrap_fid_difference(real_f, feats[("deci", match or last)], feats[("sd", last)], n_boot=n_boot)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    for recipe, style in (("deci", "o-"), ("sd", "s--")):
        ax[0].plot(grid, [fids[(recipe, s)] for s in grid], style, label=recipe)
        ax[1].plot(grid, [r["adherence"] for r in rows if r["recipe"] == recipe], style, label=recipe)
    ax[0].axhline(target, color="gray", lw=0.8, ls=":", label=f"SD @ {last} steps")
    ax[0].set_xlabel("DDIM steps")
    ax[0].set_ylabel("FID vs real scenes")
    ax[1].set_xlabel("DDIM steps")
    ax[1].set_ylabel("adherence")
    for a in ax:
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    plot = save_plot(fig, out / f"{name}.png")
    summary = (f"Both recipes: {base.steps} steps x batch {base.batch_size} on {base.scenes} scenes (identical "
               f"compute), same UNet and VAE; {n} held-out prompts (eval split, seed {scene_seed}), seed {seed}, "
               f"guidance {guidance}.\n\nTarget (Deci reaches SD's {last}-step FID {target:.2f} in >= "
               f"{TARGET_FEWER:.0%} fewer steps, i.e. <= {int((1 - TARGET_FEWER) * last)}): "
               f"**{'met' if met else 'NOT met'}** - "
               + (f"Deci first reaches it at {match} steps" if match is not None else "Deci never reaches it")
               + f"; FID(Deci @ {match or last}) - "
               f"FID(SD @ {last}) = {ci['fid_diff']:+.2f} [{ci['ci_low']:+.2f}, {ci['ci_high']:+.2f}] (bootstrap 95%).")
    paths = write_report(name, rows, title="Recipe comparison: DeciDiffusion vs SD-style at identical compute",
                         summary=summary, plots=[plot], out_dir=out,
                         extra={"target_met": met, "deci_steps_to_match": match, "sd_fid_at_max": target,
                                "bootstrap": ci, "pipelines": pipelines, "training": trained})
    return {"rows": rows, "target_met": met, "deci_steps_to_match": match, "summary": summary,
            **{k: str(v) for k, v in paths.items()}}
