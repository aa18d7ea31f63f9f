"""``stepsaver optimize``: try each inference lever here, keep what is faster and lossless, save the folder."""

from __future__ import annotations

from pathlib import Path

import typer

from stepsaver.cli.render import Col, JsonOpt, batch_sizes, command, emit_rows, log_to_stderr
from stepsaver.errors import StepsaverError

app = typer.Typer(no_args_is_help=True)


@app.command()
@command
def optimize(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the optimised model (optimize.json + base)."),
    model: str = typer.Option("tiny", "--model", "-m", help="'tiny', 'tiny-flux', a hub id or a pipeline folder."),
    levers: str = typer.Option("all", "--levers", "-l",
                               help="Comma list of levers to try (default all): channels_last, int8, "
                                    "int8_selective, bf16, compile, onnxruntime, openvino, optimum_intel."),
    prompts: Path | None = typer.Option(None, "--prompts", "-p",
                                        help="Calibration prompts, one per line (default: 4 training-scene "
                                             "captions)."),
    steps: int = typer.Option(20, "--steps", help="Denoising steps of the quality check."),
    repeats: int = typer.Option(10, "--repeats", help="Timed denoiser calls per side (median)."),
    seed: int = typer.Option(0, "--seed", help="Prompt i starts from seed + i."),
    guidance: float = typer.Option(5.0, "--guidance", "-g", help="Classifier-free guidance scale."),
    min_speedup: float = typer.Option(1.05, "--min-speedup", help="A kept lever is at least this much faster."),
    batch: str = typer.Option("1", "--batch",
                              help="Prompts per pipeline call you serve, comma-separated (e.g. 1,8): each lever is "
                                   "timed at each and judged by its worst."),
    as_json: bool = JsonOpt,
) -> None:
    """Try channels-last, torch.compile, bf16, int8, selective int8, ONNX Runtime and OpenVINO on the
    denoiser; keep each only where it is faster here and keeps PSNR >= 35 dB and LPIPS <= 0.01."""
    import torch

    from stepsaver.generation import MAX_STEPS
    from stepsaver.pipelines import load_pipeline
    from stepsaver.shrink.optimize import (
        default_prompts,
        optimize_pipeline,
        parse_levers,
        read_optimized,
        save_optimized,
        summary_rows,
    )

    names = parse_levers(levers)  # every input is checked before the model loads
    sizes = batch_sizes(batch)
    if not sizes or min(sizes) < 1:
        raise StepsaverError(f"--batch needs batch sizes >= 1, got {batch!r}; e.g. --batch 1,8")
    if not 1 <= steps <= MAX_STEPS:
        raise StepsaverError(f"steps must be in 1..{MAX_STEPS}, got {steps}")
    if repeats < 1:
        raise StepsaverError(f"repeats must be >= 1, got {repeats}")
    if min_speedup <= 0:
        raise StepsaverError(f"min speedup must be > 0, got {min_speedup}")
    if out.exists() and not out.is_dir():
        raise StepsaverError(f"--out {out} is a file; give a folder for the optimised model")
    if prompts is not None:
        from stepsaver.predict.prompts import read_prompts

        text = read_prompts(prompts)
        if not text:
            raise StepsaverError(f"prompt file {prompts} has no prompts")
    else:
        text = default_prompts()
    pipe = load_pipeline(model, scheduler=None, device="cpu", dtype=torch.float32)
    with _Progress(show=not as_json) as bar:
        result = optimize_pipeline(pipe, text, levers=names, steps=steps, seed=seed, guidance=guidance,
                                   repeats=repeats, min_speedup=min_speedup, log=log_to_stderr(as_json),
                                   progress=bar.update, batch_sizes=list(sizes))
    path = save_optimized(result, out, pipe, model=model)
    data = read_optimized(out)
    best = result.chosen_record
    rows = summary_rows(data)
    notes = [f"{r['lever']}: {r['status']}: {r['reason']}" for r in rows if r["status"] != "kept"]
    notes += [f"chosen: {' + '.join(result.chosen) if result.chosen else 'eager fp32 (no lever kept)'}"
             + (f", {best['speedup']:.2f}x per iteration" if best else ""),
             f"machine: torch {result.machine['torch']}, {result.machine['cpu']} "
             f"({' '.join(result.machine['cpu_flags'])}), {result.machine['threads']} threads",
             f"wrote {path}; load it with stepsaver.shrink.optimize.load_optimized({str(out)!r})"]
    columns = [Col("lever", "lever"), Col("status", "status"), Col("ms/iter", "latency_ms", "{:.1f}"),
               Col("eager ms", "eager_ms", "{:.1f}"), Col("speedup", "speedup", "{:.2f}x"),
               Col("PSNR min", "psnr_min", "{:.1f}"), Col("LPIPS max", "lpips_max", "{:.4f}")]
    emit_rows(rows, columns, as_json, f"optimize {model} (batch 1, {steps} steps)",
              payload={**data, "out": str(out)}, notes=notes)


class _Progress:
    """A Rich bar over optimize's stages (reference, each lever, the combination) on stderr."""

    def __init__(self, show: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description:<32}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=Console(stderr=True), disable=not show)
        self.task = self.progress.add_task("optimize", total=None)

    def __enter__(self) -> _Progress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.update(self.task, completed=self.progress.tasks[0].total or 0)
        self.progress.stop()

    def update(self, what: str, done: int, total: int) -> None:
        self.progress.update(self.task, description=what, completed=done, total=total)
