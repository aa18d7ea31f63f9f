"""Commands on the core: ``generate``, ``schedulers``, ``scenes``, ``samples``."""

from __future__ import annotations

from pathlib import Path

import typer

from stepsaver.cli.render import Col, JsonOpt, command, emit, emit_rows
from stepsaver.errors import StepsaverError
from stepsaver.files import check_output_file, write_atomically
from stepsaver.skip.config import DEFAULT_RULE, AdaptiveSkipConfig

app = typer.Typer(no_args_is_help=True)


@app.command()
@command
def generate(
    prompt: str = typer.Argument(..., help="What to draw."),
    model: str | None = typer.Option(None, "--model", "-m",
                                     help="'tiny' (embedded, the default), a hub id or a pipeline folder."),
    steps: str | None = typer.Option(None, "--steps", "-n",
                                     help="Denoising steps (1..1000, default 30), or 'auto' (the recommender)."),
    scheduler: str | None = typer.Option(None, "--scheduler", "-s",
                                         help="Sampler name (default: the model's own); see `stepsaver schedulers`."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial noise."),
    recommender: str = typer.Option("tiny", "--recommender", help="Recommender for --steps auto: 'tiny' or a folder."),
    confidence: float | None = typer.Option(None, "--confidence",
                                            help="--steps auto: fewest steps with P(enough) >= this (default argmax)."),
    guidance: float = typer.Option(5.0, "--guidance", "-g", help="Classifier-free guidance scale (>= 0)."),
    guidance_rescale: float = typer.Option(0.0, "--guidance-rescale",
                                           help="CFG rescale phi in [0, 1] (for zero-terminal-SNR models)."),
    out: Path = typer.Option(Path("stepsaver.png"), "--out", "-o", help="Where to write the PNG."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    skip: bool | None = typer.Option(None, "--skip/--no-skip", help="AdaptiveDiffusion step skipping inside the loop."),
    threshold: float | None = typer.Option(None, "--threshold",
                                           help="Skip threshold (with --skip) [default: the rule's: drift 0.1, "
                                                "criterion 0.02]."),
    max_skips: int | None = typer.Option(None, "--max-skips",
                                         help="Most consecutive skips C_max (with --skip) [default: the rule's: "
                                              "drift 6, criterion 4]."),
    skip_rule: str = typer.Option(DEFAULT_RULE, "--skip-rule",
                                  help="What decides a skip (with --skip): drift (the measured reuse error; "
                                       "--threshold is a relative error, e.g. 0.1), criterion (the paper's "
                                       "third-order test; --threshold is its delta) or fixed (one call every "
                                       "max-skips + 1 steps)."),
    config: Path | None = typer.Option(None, "--config",
                                       help="A calibrated config from `stepsaver calibrate`: its model, scheduler, "
                                            "steps, Skip and guidance."),
    as_json: bool = JsonOpt,
) -> None:
    """Generate one image and report steps, denoiser calls (made and saved) and seconds."""
    if config is not None:
        _generate_calibrated(prompt, config, model, steps, scheduler, skip, seed, guidance, out, device, as_json)
        return
    model, steps, skip = model or "tiny", steps or "30", bool(skip)
    from stepsaver.generation import generate as run_generate
    from stepsaver.generation import validate_request, validate_seed
    from stepsaver.pipelines import scheduler_spec
    from stepsaver.predict import resolve_steps
    from stepsaver.shrink.optimize import load_model

    validate_request(prompt, 1, guidance, guidance_rescale)  # fail fast, before loading weights or the recommender
    validate_seed(seed)
    n_steps, auto = resolve_steps(prompt, steps, recommender, confidence)
    validate_request(prompt, n_steps, guidance)
    if scheduler is not None:
        scheduler_spec(scheduler)
    check_output_file(out, ".png")  # before generating: an unwritable path must not cost a generation
    skip_config = AdaptiveSkipConfig(threshold=threshold, max_skips=max_skips, rule=skip_rule) if skip else None
    pipe = load_model(model, scheduler=scheduler, device=device)
    if skip_config is not None:
        from stepsaver.skip import enable_adaptive_skip

        enable_adaptive_skip(pipe, skip_config)
    result = run_generate(pipe, prompt, steps=n_steps, seed=seed, guidance=guidance,
                          guidance_rescale=guidance_rescale)
    result.extra.update(auto)
    write_atomically(out, lambda tmp: result.image.save(tmp, format="PNG"))
    emit({**result.summary(), "scheduler": scheduler or result.scheduler, "model": model, "path": str(out)}, as_json,
         "generated")


def _generate_calibrated(prompt: str, config: Path, model: str | None, steps: str | None, scheduler: str | None,
                         skip: bool | None, seed: int, guidance: float, out: Path, device: str, as_json: bool) -> None:
    """``generate --config``: the calibrated setting runs as saved; flags it already sets are refused."""
    from stepsaver.calibrate import load_calibrated
    from stepsaver.generation import generate as run_generate
    from stepsaver.generation import validate_request, validate_seed
    from stepsaver.shrink.optimize import load_model

    clash = [flag for flag, value in (("--steps", steps), ("--scheduler", scheduler), ("--skip", skip))
             if value is not None]
    if clash:
        raise StepsaverError(f"--config sets the scheduler, steps and Skip; drop {', '.join(clash)} "
                             "(or generate without --config)")
    calibrated = load_calibrated(config)
    validate_request(prompt, 1, calibrated.guidance)
    validate_seed(seed)
    check_output_file(out, ".png")
    pipe = calibrated.apply(load_model(model or calibrated.model, scheduler=None, device=device))
    result = run_generate(pipe, prompt, steps=calibrated.steps(), seed=seed, guidance=calibrated.guidance)
    write_atomically(out, lambda tmp: result.image.save(tmp, format="PNG"))
    emit({**result.summary(), "setting": calibrated.candidate.label, "model": model or calibrated.model,
          "config": str(config), "path": str(out)}, as_json, "generated")


@app.command()
@command
def schedulers(as_json: bool = JsonOpt) -> None:
    """List the sampler names and the diffusers classes they map to."""
    import json

    from stepsaver.pipelines import SCHEDULERS

    payload = {k: {"class": v.cls_name, "kwargs": v.kwargs, "denoiser_calls_per_step": 2 if v.second_order else 1}
               for k, v in SCHEDULERS.items()}
    rows = [{"name": k, **v, "kwargs_json": json.dumps(v["kwargs"])} for k, v in payload.items()]
    emit_rows(rows, [Col("name", "name"), Col("diffusers class", "class"), Col("kwargs", "kwargs_json"),
                     Col("calls/step", "denoiser_calls_per_step")], as_json, "", payload={"schedulers": payload})


@app.command()
@command
def scenes(
    out: Path = typer.Argument(..., help="Folder to write images.npy, scenes.jsonl and grid.png into."),
    n: int = typer.Option(1000, "--n", help="Number of scenes."),
    seed: int = typer.Option(0, "--seed"),
    split: str = typer.Option("train", "--split", help="train, or eval (held-out compositions)."),
    font: str | None = typer.Option(None, "--font", help="Colour emoji font (Noto Color Emoji)."),
    as_json: bool = JsonOpt,
) -> None:
    """Render captioned emoji scenes (the embedded model's data) with a preview grid."""
    from stepsaver.shrink.grid import write_scene_preview

    emit(write_scene_preview(out, n, seed=seed, split=split, font=font, progress=not as_json), as_json, "scenes")


@app.command()
@command
def samples(
    out: Path = typer.Option(Path("samples.png"), "--out", "-o", help="PNG grid to write."),
    model: str = typer.Option("tiny", "--model", "-m"),
    n: int = typer.Option(16, "--n", help="How many held-out scene prompts."),
    steps: int = typer.Option(30, "--steps"),
    scheduler: str = typer.Option("ddim", "--scheduler"),
    guidance: float = typer.Option(5.0, "--guidance"),
    guidance_rescale: float = typer.Option(0.0, "--guidance-rescale"),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = JsonOpt,
) -> None:
    """Grid of held-out scene prompts: the real scene beside the model's image."""
    from stepsaver.generation import validate_request
    from stepsaver.shrink.grid import render_eval_grid
    from stepsaver.shrink.optimize import load_model

    validate_request("scenes", steps, guidance)
    if n <= 0:
        raise StepsaverError(f"--n must be positive, got {n}")
    pipe = load_model(model, scheduler=scheduler)
    path = render_eval_grid(pipe, out, n=n, steps=steps, guidance=guidance, seed=seed,
                            guidance_rescale=guidance_rescale)
    emit({"grid": str(path), "model": model, "steps": steps, "scheduler": scheduler, "n": n}, as_json, "samples")
