"""Train the embedded model's autoencoder (diffusers ``AutoencoderKL``) on emoji scenes.

Scenes are drawn on the fly from :class:`SceneGenerator` (a scene costs ~0.3 ms to draw), so
the autoencoder never sees the same image twice and needs no data set on disk. The loss is
SD's: per-image summed L1 + MSE reconstruction plus a 1e-6-weighted KL. At the end the latent
scale is measured (``scaling_factor = 1 / std``, as SD did) so the diffusion model sees
unit-variance latents, and the PSNR of held-out reconstructions is written next to the weights.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from stepsaver.scenes import SceneGenerator
from stepsaver.shrink.architecture import vae_config
from stepsaver.shrink.checkpoint import load_checkpoint, save_checkpoint


@dataclass
class AutoencoderTrainConfig:
    out: str = "runs/vae"
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    kl_weight: float = 1e-6
    seed: int = 0
    checkpoint_every: int = 100
    eval_images: int = 512
    font: str | None = None


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], the range diffusers' VAEs use."""
    return torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def batch_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of a batch of images in [-1, 1] (Measure's PSNR of the pooled MSE)."""
    from stepsaver.measure.quality import psnr

    return float(psnr((a.clamp(-1, 1) + 1) / 2, (b.clamp(-1, 1) + 1) / 2, per_image=False))


def warmup_cosine(steps: int, warmup: int = 50) -> Callable[[int], float]:
    """LR factor: linear warm-up over ``warmup`` steps, then cosine from 1 down to 10% at ``steps``."""
    def factor(s: int) -> float:
        return min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return factor


def progress_columns(label: str) -> tuple:
    """Rich progress layout of the autoencoder trainers: label, bar, steps, live info, time left."""
    return (TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn())


def train_autoencoder(cfg: AutoencoderTrainConfig, resume: bool = True) -> dict:
    """Train (or continue training) the autoencoder; returns the final metrics."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator()
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(**vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.steps))
    vae, opt = accelerator.prepare(vae, opt)
    step = 0
    ckpt = out / "checkpoint.pt"
    if resume and ckpt.exists():
        step = load_checkpoint(ckpt, accelerator.unwrap_model(vae), opt, sched)
    gen = SceneGenerator(seed=cfg.seed, split="train", font=cfg.font)
    columns = progress_columns("vae")
    t0, seen = time.time(), 0
    with Progress(*columns, disable=not accelerator.is_main_process) as bar:
        task = bar.add_task("vae", total=cfg.steps, completed=step, info="")
        while step < cfg.steps:
            images, _ = next(gen.iter_batches(step * cfg.batch_size, (step + 1) * cfg.batch_size))
            x = images_to_tensor(images).to(accelerator.device)
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
            err = rec - x
            recon = (err.abs() + err.pow(2)).flatten(1).sum(1).mean()
            kl = post.kl().mean()
            loss = recon + cfg.kl_weight * kl
            accelerator.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            seen += 1
            if step % 10 == 0:
                bar.update(task, completed=step, info=f"loss/px {recon.item() / x[0].numel():.4f} "
                           f"psnr {batch_psnr(rec.detach(), x):.1f}dB {seen / (time.time() - t0):.2f} it/s")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint(ckpt, accelerator.unwrap_model(vae), opt, sched, step)
    vae = accelerator.unwrap_model(vae).eval()
    metrics = evaluate_autoencoder(vae, cfg, accelerator.device)
    vae.register_to_config(scaling_factor=metrics["scaling_factor"])
    vae.save_pretrained(out / "vae")
    (out / "vae_metrics.json").write_text(json.dumps({**metrics, "config": asdict(cfg)}, indent=2))
    return metrics


@torch.no_grad()
def evaluate_autoencoder(vae: AutoencoderKL, cfg: AutoencoderTrainConfig, device: torch.device) -> dict:
    """PSNR of reconstructions of held-out (eval split) scenes, and the latent std."""
    gen = SceneGenerator(seed=cfg.seed, split="eval", font=cfg.font)
    psnrs, latents = [], []
    for images, _ in gen.iter_batches(0, cfg.eval_images, batch=64):
        x = images_to_tensor(images).to(device)
        post = vae.encode(x).latent_dist
        psnrs.append(batch_psnr(vae.decode(post.mode()).sample, x))
        latents.append(post.sample())
    z = torch.cat(latents)
    std = z.std().item()
    return {"psnr_db": float(np.mean(psnrs)), "latent_std": std, "latent_mean": z.mean().item(),
            "scaling_factor": 1.0 / std}
