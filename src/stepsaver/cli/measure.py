"""``stepsaver measure ...``: the instruments' own training (the adherence classifier)."""

from __future__ import annotations

from pathlib import Path

import typer

from stepsaver.cli.render import JsonOpt, command, emit, log_to_stderr

app = typer.Typer(no_args_is_help=True, help="Measure: instruments (FID, LPIPS, adherence) and their training.")

FLAT = {"train-adherence": "train-adherence"}


@app.command("train-adherence")
@command
def train_adherence_cmd(
    out: Path | None = typer.Option(None, "--out", help="Folder for the weights (default: the shipped ones)."),
    steps: int = typer.Option(4000, "--steps"),
    batch: int = typer.Option(64, "--batch"),
    finetune_steps: int = typer.Option(1500, "--finetune-steps", help="Phase 2: scenes through the VAE."),
    eval_n: int = typer.Option(2000, "--eval-n", help="Held-out real scenes to score the classifier on."),
    as_json: bool = JsonOpt,
) -> None:
    """Retrain the adherence classifier (both phases) and record its held-out accuracy beside it."""
    from stepsaver.measure.adherence import build_shipped_weights
    from stepsaver.measure.adherence.captions import SHIPPED_DIR

    metrics = build_shipped_weights(out or SHIPPED_DIR, steps=steps, finetune_steps=finetune_steps, eval_n=eval_n,
                                    batch=batch, log=log_to_stderr(as_json))
    emit(metrics, as_json, "adherence classifier")
