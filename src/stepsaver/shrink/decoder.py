"""Sharpen a trained autoencoder's decoder without touching the latent space (`stepsaver tune-decoder`).

Why: the embedded model's small objects are soft partly because its autoencoder is (24 dB,
trained 28 CPU minutes with L1 + MSE only, which favours blur). Retraining the whole autoencoder
would move the latent space and throw away the UNet trained on it. Freezing the encoder (and its
``quant_conv``) keeps every latent, the ``scaling_factor`` and hence the UNet valid, so only the
decoder (and ``post_quant_conv``) learns; SD's autoencoder recipe adds a perceptual LPIPS term to
the pixel loss for exactly this reason (pixel losses average plausible details into blur). The
decoder is trained on *sampled* latents, as the diffusion model produces samples, not means.

``--into-pipeline`` writes a copy of a pipeline folder with the new decoder (fp16, as shipped),
ready for ``stepsaver bench models`` against the original.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from rich.progress import Progress

from stepsaver.errors import StepsaverError
from stepsaver.measure.lpips import LPIPS
from stepsaver.scenes import SceneGenerator
from stepsaver.shrink.autoencoder import batch_psnr, images_to_tensor, progress_columns, warmup_cosine
from stepsaver.shrink.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["DecoderTuneConfig", "tune_decoder"]


@dataclass
class DecoderTuneConfig:
    vae: str
    out: str = "runs/vae-decoder"
    steps: int = 2500
    batch_size: int = 32
    lr: float = 3e-4
    lpips_weight: float = 1.0
    seed: int = 1
    checkpoint_every: int = 100
    eval_images: int = 512
    into_pipeline: str | None = None
    font: str | None = None


def _load_vae(folder: str) -> AutoencoderKL:
    path = Path(folder)
    if (path / "vae" / "config.json").exists():  # a pipeline folder was given
        path = path / "vae"
    if not (path / "config.json").exists():
        raise StepsaverError(f"no AutoencoderKL folder at {folder} (expected config.json); "
                             "pass --vae runs/vae/vae or a pipeline folder")
    return AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32)


def _frozen_parts(vae: AutoencoderKL) -> list[torch.nn.Module]:
    return [m for m in (vae.encoder, getattr(vae, "quant_conv", None)) if m is not None]


@torch.no_grad()
def evaluate_decoder(vae: AutoencoderKL, lpips: LPIPS, n: int, font: str | None, device: torch.device) -> dict:
    """PSNR and LPIPS-alex of held-out (eval split) reconstructions decoded from the latent mean."""
    gen = SceneGenerator(seed=0, split="eval", font=font)
    psnrs, dists = [], []
    for images, _ in gen.iter_batches(0, n, batch=64):
        x = images_to_tensor(images).to(device)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        psnrs.append(batch_psnr(rec, x))
        dists.append(lpips(rec, x).mean().item())
    return {"psnr_db": float(np.mean(psnrs)), "lpips_alex": float(np.mean(dists))}


def tune_decoder(cfg: DecoderTuneConfig, resume: bool = True) -> dict:
    """Fine-tune the decoder of ``cfg.vae`` (encoder frozen); returns before/after metrics."""
    if cfg.steps <= 0 or cfg.batch_size <= 0:
        raise StepsaverError("--steps and --batch-size must be positive")
    if cfg.into_pipeline is not None and not (Path(cfg.into_pipeline) / "model_index.json").exists():
        raise StepsaverError(f"--into-pipeline {cfg.into_pipeline} is not a pipeline folder (no model_index.json)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator()
    torch.manual_seed(cfg.seed)
    vae = _load_vae(cfg.vae)
    for part in _frozen_parts(vae):
        part.requires_grad_(False)
    lpips = LPIPS("alex").to(accelerator.device)
    trainable = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.steps))
    vae, opt = accelerator.prepare(vae, opt)
    model = accelerator.unwrap_model(vae)
    metrics_path = out / "decoder_metrics.json"
    step, ckpt = 0, out / "checkpoint.pt"
    if resume and ckpt.exists():
        step = load_checkpoint(ckpt, model, opt, sched)
        before = json.loads((out / "before.json").read_text())
    else:
        model.eval()
        before = evaluate_decoder(model, lpips, cfg.eval_images, cfg.font, accelerator.device)
        (out / "before.json").write_text(json.dumps(before))
    model.decoder.train()
    gen = SceneGenerator(seed=cfg.seed, split="train", font=cfg.font)
    columns = progress_columns("decoder")
    t0, done = time.time(), 0
    with Progress(*columns, disable=not accelerator.is_main_process) as bar:
        task = bar.add_task("decoder", total=cfg.steps, completed=step, info="")
        while step < cfg.steps:
            images, _ = next(gen.iter_batches(step * cfg.batch_size, (step + 1) * cfg.batch_size))
            x = images_to_tensor(images).to(accelerator.device)
            with torch.no_grad():
                z = model.encode(x).latent_dist.sample()
            rec = model.decode(z).sample
            err = rec - x
            pixel = err.abs().mean() + err.pow(2).mean()
            perceptual = lpips(rec.clamp(-1, 1), x).mean()
            loss = pixel + cfg.lpips_weight * perceptual
            accelerator.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            done += 1
            if step % 10 == 0:
                bar.update(task, completed=step, info=f"pixel {pixel.item():.4f} lpips {perceptual.item():.4f} "
                           f"psnr {batch_psnr(rec.detach(), x):.1f}dB {done / (time.time() - t0):.2f} it/s")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint(ckpt, model, opt, sched, step)
    model.eval()
    after = evaluate_decoder(model, lpips, cfg.eval_images, cfg.font, accelerator.device)
    model.save_pretrained(out / "vae", safe_serialization=True)
    figure = _reconstruction_figure(_load_vae(cfg.vae), model, out / "reconstructions.png", cfg.font,
                                    accelerator.device)
    result = {"before": before, "after": after, "seconds_this_run": time.time() - t0,
              "vae": str(out / "vae"), "figure": str(figure), "config": asdict(cfg)}
    if cfg.into_pipeline is not None:
        result["pipeline"] = str(_write_pipeline(model, Path(cfg.into_pipeline), out / "pipeline"))
    metrics_path.write_text(json.dumps(result, indent=2))
    return result


@torch.no_grad()
def _reconstruction_figure(old: AutoencoderKL, new: AutoencoderKL, png: Path, font: str | None,
                           device: torch.device, n: int = 8) -> Path:
    """Held-out scenes: real | old decoder | new decoder (the same latent means)."""
    from stepsaver.shrink.grid import save_grid

    gen = SceneGenerator(seed=0, split="eval", font=font)
    images, scenes = next(gen.iter_batches(0, n))
    x = images_to_tensor(images).to(device)
    z = new.encode(x).latent_dist.mode()  # the encoder is shared: old and new see the same latents

    def to_uint8(vae: AutoencoderKL) -> np.ndarray:
        rec = vae.to(device).decode(z).sample.clamp(-1, 1)
        return ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()

    side = np.concatenate([images, to_uint8(old), to_uint8(new)], axis=2)
    return save_grid(png, side, [s.caption for s in scenes], cols=2)


def _write_pipeline(vae: AutoencoderKL, source: Path, dest: Path) -> Path:
    """Copy ``source`` to ``dest`` with ``vae/`` replaced by ``vae`` in fp16; atomic by rename."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("vae"))
    vae.to(torch.float16).save_pretrained(tmp / "vae", safe_serialization=True)
    vae.to(torch.float32)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest
