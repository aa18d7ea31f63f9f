"""``stepsaver bench calibrate``: issue 20's targets, measured with real ``calibrate`` runs in one report.

For each embedded model and each tolerance, ``calibrate`` runs on ``n`` held-out scene captions
(a fresh prompt seed, not the one any default was tuned on), with the model's own scheduler at
50 steps as the reference, and the shipped recommender in the search for the model it was
trained for. Runs of one model share a render cache, so the first tolerance pays for most
renders and the report says so: its CPU minutes are the honest "calibrating takes" number.
``labels`` (per model: label rows with several seeds per prompt, e.g. the shipped
``data/labels/tiny-train``) add calibrate's predictability line to that model's runs: how much of
the step label the prompt decides, so the report says whether Predict can pay there at all.

Targets checked and written as verdicts:

* the chosen setting holds on the held-out prompts with confidence (the 95% interval's worse
  end inside the tolerance);
* it is at least as fast (denoiser calls per image) as the best single-knob setting (plain
  steps, Skip alone, recommender alone) that holds on those same held-out prompts;
* calibrating on 64 prompts takes under 15 CPU minutes on the embedded UNet model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stepsaver.errors import StepsaverError

__all__ = ["bench_calibrate"]

TARGET_CPU_MINUTES = 15.0


def _verdicts(name: str, res: Any, first: bool) -> list[str]:
    s = res.summary
    held = "holds with confidence" if s["heldout_holds_with_confidence"] else "does NOT hold with confidence"
    out = [f"- **{name}**: held-out {held} ({s['tolerance'].split()[0]} {s['heldout_statistic']}, "
           f"interval {s['heldout_interval']})"]
    ratio = s["vs_best_single_knob"]
    if ratio is None:
        out.append("  no single knob holds with confidence on the held-out prompts: nothing to compare with")
    else:
        word = "faster than" if ratio > 1.0 + 1e-9 else ("as fast as" if abs(ratio - 1.0) <= 1e-9 else "SLOWER than")
        caveat = "" if s["heldout_holds_with_confidence"] else \
            " (but only that knob holds with confidence on these prompts, so the target is not met)"
        out.append(f"  chosen ({s['chosen']}) is {word} the best single knob ({s['best_single_knob']}): "
                   f"{ratio:.3f}x its cost{caveat}")
    cpu = s["cpu_minutes"]
    if first:
        out.append(f"  calibration took {cpu} CPU minutes ({s['wall_minutes']} wall) from an empty render cache: "
                   f"{'under' if cpu < TARGET_CPU_MINUTES else 'OVER'} the {TARGET_CPU_MINUTES:g}-minute target")
    else:
        out.append(f"  {cpu} CPU minutes, reusing the renders of the run before it")
    return out


def bench_calibrate(models: Sequence[str] = ("tiny",), tolerances: Sequence[str] = ("lpips<=0.02", "lpips<=0.05"),
                    *, n: int = 64, prompt_seed: int = 11, reference_steps: int = 50,
                    work: str | Path = "runs/calibrate-bench",
                    budget_minutes: float | None = None, batch_size: int = 8, out_dir: str | Path = "docs/results",
                    name: str = "calibrate", show_progress: bool = True, device: str = "auto",
                    space: Any = None, log: Any = None, labels: dict[str, Sequence[dict]] | None = None,
                    **call_kwargs: Any) -> dict[str, Any]:
    """Run ``calibrate`` for each model x tolerance and write ``<name>.{md,json,png}``."""
    from stepsaver.calibrate import calibrate, parse_tolerance
    from stepsaver.calibrate.report import write_calibration_report
    from stepsaver.pipelines import load_pipeline
    from stepsaver.scenes import SceneGenerator

    tols = [parse_tolerance(t) for t in tolerances]
    if not models or not tols:
        raise StepsaverError("bench calibrate needs at least one model and one tolerance")
    labels = dict(labels or {})
    unknown = sorted(set(labels) - set(models))
    if unknown:
        raise StepsaverError(f"labels were given for {', '.join(unknown)}, which is not among the models calibrated "
                             f"({', '.join(models)}); give labels as MODEL=PATH for one of those")
    gen = SceneGenerator(seed=prompt_seed, split="eval")
    prompts = [gen.sample(i).caption for i in range(n)]
    results, verdicts = [], []
    for model in models:
        pipe = load_pipeline(model, scheduler=None, device=device)
        folder = Path(work) / model
        fresh = not folder.exists()
        for k, tol in enumerate(tols):
            res = calibrate(pipe, prompts, tol, model=model, reference_steps=reference_steps,
                            recommender="tiny" if model == "tiny" else None,
                            work=folder, batch_size=batch_size, budget_minutes=budget_minutes, space=space,
                            show_progress=show_progress, log=log, labels=labels.get(model), **call_kwargs)
            run = f"{model}: {tol}"
            results.append((run, res))
            res.config.save(Path(out_dir) / f"{name}-{model}-{tol.metric}{tol.bound:g}.config.json")
            verdicts += _verdicts(run, res, first=(k == 0 and fresh))
        del pipe
        if not fresh:
            verdicts.append(f"  ({model}'s render cache {folder} existed before this run; delete it "
                            "to time a calibration from scratch)")
    held = float(call_kwargs.get("heldout", 0.25))  # calibrate's default share of held-out prompts
    preamble = ("Issue 20's targets, on held-out scene captions (prompt seed "
                f"{prompt_seed}, {n} prompts: a {100 * (1 - held):.0f}/{100 * held:.0f} calibration/held-out split), "
                "reference = the model's own "
                f"scheduler at {reference_steps} steps, quality = LPIPS (AlexNet) to the reference image of the "
                "same prompt and noise. Cost = denoiser calls per image; a single knob's baseline is its cheapest "
                "setting that holds with confidence on the held-out prompts themselves (an oracle choice, so the "
                "comparison favours the baseline).\n\n" + "\n".join(verdicts) + "\n\n")
    paths = write_calibration_report(results, name=name, out_dir=out_dir, title="Calibrate: issue 20's targets",
                                     preamble=preamble)
    return {"results": results, "verdicts": verdicts, **{k: str(v) for k, v in paths.items()}}
