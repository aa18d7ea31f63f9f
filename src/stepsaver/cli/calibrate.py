"""``stepsaver calibrate``: search the cheapest setting that keeps a tolerance, write it as a config file."""

from __future__ import annotations

from pathlib import Path

import typer

from stepsaver.cli.render import JsonOpt, command, emit, log_to_stderr
from stepsaver.errors import StepsaverError

app = typer.Typer(no_args_is_help=True)


def parse_reference(text: str) -> tuple[int, str]:
    """``"steps=50"`` or ``"steps=50,scheduler=ddim"`` -> (steps, scheduler)."""
    parts = dict(p.split("=", 1) for p in text.replace(" ", "").split(",") if "=" in p)
    unknown = set(parts) - {"steps", "scheduler"}
    if unknown or "steps" not in parts or any("=" not in p for p in text.replace(" ", "").split(",")):
        raise StepsaverError(f"cannot read reference {text!r}; write steps=50 or steps=50,scheduler=ddim")
    try:
        steps = int(parts["steps"])
    except ValueError:
        raise StepsaverError(f"reference steps must be an integer, got {parts['steps']!r}") from None
    if not 1 <= steps <= 1000:
        raise StepsaverError(f"reference steps must be in 1..1000, got {steps}")
    return steps, parts.get("scheduler", "own")


def _floats(text: str, what: str) -> tuple[float, ...]:
    if text.strip().lower() in ("", "none", "off"):
        return ()
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise StepsaverError(f"cannot read {what} {text!r}; write a comma-separated list, e.g. 0.01,0.02") from None


@app.command()
@command
def calibrate(
    prompts: Path = typer.Option(..., "--prompts", "-p",
                                 help="Prompts: txt (one a line), csv, jsonl, json, parquet; >= 4."),
    tolerance: str = typer.Option(..., "--tolerance", "-t",
                                  help="e.g. 'lpips<=0.05', 'psnr>=35', 'ssim>=0.95', 'lpips<=0.05 for 95%'."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the calibrated config (JSON)."),
    model: str = typer.Option("tiny", "--model", "-m", help="'tiny', 'tiny-flux', a hub id or a pipeline folder."),
    reference: str = typer.Option("steps=50", "--reference", help="The quality reference: steps=N[,scheduler=S]."),
    scheduler: list[str] = typer.Option([], "--scheduler", "-s",
                                        help="Schedulers to search (repeat; default: the model's own)."),
    steps: str = typer.Option("4,6,8,10,12,15,20,25,30,40,50", "--steps", help="Step counts to search."),
    skip_thresholds: str = typer.Option("0.01,0.02,0.04,0.08", "--skip-thresholds",
                                        help="Skip thresholds to search ('none': no Skip)."),
    max_skips: str = typer.Option("2,4", "--max-skips", help="Skip C_max values to search."),
    drift_thresholds: str = typer.Option("0.08,0.15", "--drift-thresholds",
                                         help="Skip's drift rule: relative reuse errors to search, at C_max 6 "
                                              "('none': not searched)."),
    recommender: str = typer.Option("auto", "--recommender",
                                    help="'auto' (the shipped one for --model tiny), 'none', or a folder."),
    confidences: str = typer.Option("0.5,0.7,0.9", "--confidences", help="Recommender confidences to search."),
    caches: bool = typer.Option(True, "--caches/--no-caches",
                                help="Search diffusers' caches where the model has them."),
    budget_minutes: float | None = typer.Option(None, "--budget-minutes", help="Stop searching after this long."),
    heldout: float = typer.Option(0.25, "--heldout", help="Share of prompts held out for validation."),
    guidance: float = typer.Option(5.0, "--guidance", "-g", help="Classifier-free guidance scale."),
    seed: int = typer.Option(0, "--seed", help="Prompt i starts from seed + i."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per pipeline call."),
    work: Path | None = typer.Option(None, "--work", help="Render cache (resumable); default runs/calibrate."),
    report: Path | None = typer.Option(None, "--report", help="Also write PREFIX.{md,json,png} (frontier, plot)."),
    labels: list[Path] = typer.Option([], "--labels",
                                      help="Label files/folders with several seeds per prompt (`label --seeds 3`): "
                                           "report how far the prompt alone predicts the step count."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    as_json: bool = JsonOpt,
) -> None:
    """Find the cheapest configuration whose images stay within the tolerance, and save it for production."""
    from stepsaver.calibrate import SearchSpace, parse_tolerance
    from stepsaver.calibrate import calibrate as run_calibrate
    from stepsaver.calibrate.space import OWN
    from stepsaver.files import check_output_file
    from stepsaver.pipelines import scheduler_spec, weights_fingerprint
    from stepsaver.predict.label import parse_grid
    from stepsaver.predict.prompts import read_prompts
    from stepsaver.shrink.optimize import load_model

    tol = parse_tolerance(tolerance)  # every input is checked before the model loads
    ref_steps, ref_scheduler = parse_reference(reference)
    for name in (*scheduler, ref_scheduler):
        if name != OWN:
            scheduler_spec(name)
    grid = parse_grid(steps, at_least=1)
    space = SearchSpace(schedulers=tuple(scheduler) or (OWN,), steps=grid,
                        skip_thresholds=_floats(skip_thresholds, "skip thresholds"),
                        skip_max=tuple(int(x) for x in _floats(max_skips, "max skips")),
                        drift_thresholds=_floats(drift_thresholds, "drift thresholds"),
                        confidences=_floats(confidences, "confidences"),
                        caches=SearchSpace().caches if caches else ())
    space.validate(ref_steps)
    text = read_prompts(prompts)
    label_rows = None
    if labels:
        from stepsaver.predict.dataset import read_label_rows

        label_rows = read_label_rows(labels)
    check_output_file(out, ".json")
    rec = None
    if recommender == "auto":
        rec = "tiny" if model == "tiny" and space.confidences else None
    elif recommender.lower() != "none" and space.confidences:
        rec = recommender
    pipe = load_model(model, scheduler=None, device=device)
    work = work or Path("runs/calibrate") / (weights_fingerprint(model) or "model")
    result = run_calibrate(pipe, text, tol, model=model, reference_steps=ref_steps, reference_scheduler=ref_scheduler,
                           space=space, recommender=rec, guidance=guidance, heldout=heldout, seed=seed,
                           batch_size=batch_size, budget_minutes=budget_minutes, work=work,
                           show_progress=not as_json, labels=label_rows, log=log_to_stderr(as_json))
    result.config.save(out)
    paths = {}
    if report is not None:
        from stepsaver.calibrate.report import write_calibration_report

        paths = write_calibration_report([(f"{model}: {tol}", result)], name=report.name, out_dir=report.parent,
                                         title=f"Calibrate {model} for {tol}")
    s = result.summary
    emit({"chosen": s["chosen"], "tolerance": s["tolerance"], "heldout": s["heldout_statistic"],
          "heldout_interval": s["heldout_interval"], "heldout_holds": s["heldout_holds_with_confidence"],
          "speedup_calls": s["speedup_calls"], "speedup_seconds": s["speedup_seconds"],
          "best_single_knob": s["best_single_knob"], "vs_best_single_knob": s["vs_best_single_knob"],
          "minutes": s["wall_minutes"], "config": str(out), **{f"report_{k}": str(v) for k, v in paths.items()},
          **({"predictability": s["predictability_note"]} if "predictability_note" in s else {})},
         as_json, "calibrated")
