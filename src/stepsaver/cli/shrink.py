"""``stepsaver shrink ...``: train the embedded model's autoencoder, decoder and denoiser.

The flat names (``stepsaver train-vae``, ``tune-decoder``, ``train-model``) stay as aliases.
"""

from __future__ import annotations

from pathlib import Path

import typer

from stepsaver.cli.render import JsonOpt, command, emit
from stepsaver.cli.search import search_cmd
from stepsaver.errors import StepsaverError

app = typer.Typer(no_args_is_help=True, help="Shrink (DeciDiffusion): train the embedded models.")

FLAT = {"train-vae": "train-vae", "tune-decoder": "tune-decoder", "train-model": "train-model",
        "train-flux": "train-flux"}


@app.command("train-vae")
@command
def train_vae(
    out: Path = typer.Option(Path("runs/vae"), "--out"),
    steps: int = typer.Option(1200, "--steps"),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(1e-3, "--lr"),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from out/checkpoint.pt."),
    as_json: bool = JsonOpt,
) -> None:
    """Train the embedded model's AutoencoderKL on scenes drawn on the fly."""
    from stepsaver.shrink.autoencoder import AutoencoderTrainConfig, train_autoencoder

    if steps <= 0 or batch_size <= 0:
        raise StepsaverError("--steps and --batch-size must be positive")
    metrics = train_autoencoder(AutoencoderTrainConfig(out=str(out), steps=steps, batch_size=batch_size,
                                                       lr=lr, seed=seed), resume=resume)
    emit({**metrics, "vae": str(out / "vae")}, as_json, "autoencoder")


@app.command("tune-decoder")
@command
def tune_decoder_cmd(
    vae: Path = typer.Option(..., "--vae", help="Trained AutoencoderKL folder (or a pipeline folder)."),
    out: Path = typer.Option(Path("runs/vae-decoder"), "--out"),
    steps: int = typer.Option(2500, "--steps"),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(3e-4, "--lr"),
    lpips_weight: float = typer.Option(1.0, "--lpips-weight", help="Weight of the LPIPS-alex term."),
    seed: int = typer.Option(1, "--seed"),
    into_pipeline: Path | None = typer.Option(None, "--into-pipeline",
                                              help="Also write OUT/pipeline: this pipeline with the new decoder."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from out/checkpoint.pt."),
    as_json: bool = JsonOpt,
) -> None:
    """Fine-tune only the decoder of a trained autoencoder (encoder frozen, so the UNet stays valid)."""
    from stepsaver.shrink.decoder import DecoderTuneConfig, tune_decoder

    result = tune_decoder(DecoderTuneConfig(vae=str(vae), out=str(out), steps=steps, batch_size=batch_size, lr=lr,
                                            lpips_weight=lpips_weight, seed=seed,
                                            into_pipeline=None if into_pipeline is None else str(into_pipeline)),
                          resume=resume)
    flat = {f"{k} {when}": v for when in ("before", "after") for k, v in result[when].items()}
    emit(result if as_json else {**flat, "vae": result["vae"], "pipeline": result.get("pipeline")}, as_json, "decoder")


@app.command("train-model")
@command
def train_model_cmd(
    out: Path = typer.Option(Path("runs/model"), "--out"),
    vae: Path = typer.Option(Path("runs/vae/vae"), "--vae", help="Trained AutoencoderKL folder."),
    recipe: str = typer.Option("deci", "--recipe", help="deci (DeciDiffusion) or sd (SD-1.5-style baseline)."),
    steps: int = typer.Option(5000, "--steps"),
    batch_size: int = typer.Option(64, "--batch-size"),
    scenes: int = typer.Option(40000, "--scenes", help="Training scenes to precompute."),
    lr: float = typer.Option(4e-4, "--lr"),
    ema_fraction: float = typer.Option(0.1, "--ema-fraction", help="Deci: EMA over the last fraction of steps."),
    min_snr_gamma: float = typer.Option(5.0, "--min-snr-gamma"),
    cfg_dropout: float = typer.Option(0.1, "--cfg-dropout"),
    checkpoint_every: int = typer.Option(250, "--checkpoint-every"),
    cache: Path = typer.Option(Path("runs/cache"), "--cache", help="Where scenes, embeddings and moments go."),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from out/checkpoint.pt."),
    max_minutes: float | None = typer.Option(None, "--max-minutes",
                                                help="Stop (checkpointed, resumable) after this long."),
    warmup: int = typer.Option(200, "--warmup", help="Linear LR warm-up steps."),
    scene_seed: int | None = typer.Option(None, "--scene-seed",
                                          help="Seed of the scene set (default: --seed); --seed then only "
                                               "drives batches and noise."),
    init_from: Path | None = typer.Option(None, "--init-from",
                                          help="Warm-start the UNet from a pipeline (or unet/) folder."),
    as_json: bool = JsonOpt,
) -> None:
    """Train the text-to-image UNet with the DeciDiffusion recipe (or the SD baseline)."""
    from stepsaver.shrink.train import TrainConfig, train_model

    cfg = TrainConfig(out=str(out), vae=str(vae), recipe=recipe, steps=steps, batch_size=batch_size,
                      scenes=scenes, lr=lr, ema_fraction=ema_fraction, min_snr_gamma=min_snr_gamma,
                      cfg_dropout=cfg_dropout, checkpoint_every=checkpoint_every, cache=str(cache), seed=seed,
                      warmup=warmup, scene_seed=scene_seed, init_from=None if init_from is None else str(init_from))
    summary = train_model(cfg, resume=resume, progress=not as_json, max_minutes=max_minutes)
    summary.pop("history", None)
    emit(summary, as_json, f"trained ({recipe})")


@app.command("train-flux")
@command
def train_flux_cmd(
    out: Path = typer.Option(Path("runs/tiny-flux"), "--out", help="Run folder (checkpoints, history, grid)."),
    vae: Path | None = typer.Option(None, "--vae", help="Autoencoder folder (default: the shipped model's)."),
    steps: int = typer.Option(10000, "--steps"),
    batch_size: int = typer.Option(64, "--batch-size"),
    scenes: int = typer.Option(40000, "--scenes", help="Training scenes to precompute (shared with train-model)."),
    lr: float = typer.Option(4e-4, "--lr"),
    cache: Path = typer.Option(Path("runs/cache"), "--cache", help="Where scenes, embeddings and moments go."),
    seed: int = typer.Option(0, "--seed"),
    checkpoint_every: int = typer.Option(400, "--checkpoint-every"),
    export_to: Path | None = typer.Option(None, "--export-to",
                                          help="Also write the finished fp16 pipeline here (the shipped one: "
                                               "src/stepsaver/models/tiny-flux)."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: torch's own)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from out/checkpoint.pt."),
    max_minutes: float | None = typer.Option(None, "--max-minutes",
                                             help="Stop (checkpointed, resumable) after this long."),
    as_json: bool = JsonOpt,
) -> None:
    """Train tiny-flux (FluxTransformer2DModel, flow matching) on the scene set; SIGTERM checkpoints and stops."""
    from stepsaver.shrink.train_flux import FluxTrainConfig, train_flux_until_signalled

    cfg = FluxTrainConfig(out=str(out), steps=steps, batch_size=batch_size, scenes=scenes, lr=lr, cache=str(cache),
                          seed=seed, checkpoint_every=checkpoint_every,
                          export_to=None if export_to is None else str(export_to),
                          **({} if vae is None else {"vae": str(vae)}))
    summary = train_flux_until_signalled(cfg, resume=resume, max_minutes=max_minutes, threads=threads,
                                         progress=not as_json)
    summary.pop("history", None)
    emit(summary, as_json, "trained (tiny-flux)")


app.command("search")(search_cmd)
