"""Precompute, once, what every training step would otherwise recompute: VAE moments and text embeddings.

DeciDiffusion's recipe stores the autoencoder's posterior moments (mean and log-variance) and
the caption embeddings on disk; a training step then only samples ``mean + std * noise`` and
looks up the embedding, so neither the VAE encoder nor the text encoder runs during training.
That is also what lets training travel to a lent GPU without the 84 MB MiniLM wheel.

Both arrays are written chunk by chunk into ``.npy`` memory maps with a ``.done`` counter,
so a killed precompute resumes at the first unfinished chunk.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from stepsaver.text import TEXT_DIM, encode_captions


def _resumable_fill(path: Path, shape: tuple[int, ...], chunk: int, fill: Callable[[int, int], np.ndarray],
                    label: str, progress: bool = True) -> np.ndarray:
    """Fill a float16 ``.npy`` memmap chunk by chunk, recording progress in ``<path>.done``."""
    done_file = path.with_suffix(".done")
    done = int(done_file.read_text()) if done_file.exists() and path.exists() else 0
    if done == 0 or not path.exists():
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
    else:
        arr = np.load(path, mmap_mode="r+")
    n = shape[0]
    with Progress(disable=not progress) as bar:
        task = bar.add_task(label, total=n, completed=done)
        for start in range(done, n, chunk):
            stop = min(n, start + chunk)
            arr[start:stop] = fill(start, stop)
            arr.flush()
            done_file.write_text(str(stop))
            bar.update(task, completed=stop)
    return np.load(path, mmap_mode="r")


def precompute_text(cache: Path, captions: Sequence[str], encoder, tokenizer, device="cpu",
                    progress: bool = True) -> np.ndarray:
    """Caption embeddings ``[N, T, 384]`` (float16), plus the empty prompt's in ``uncond.npy``.

    ``T`` is the tokenizer's ``model_max_length``: the UNet's ``MAX_TOKENS``, or the longer
    length tiny-flux pads to; the embeddings are what the pipeline's own encoder would produce.
    """
    cache.mkdir(parents=True, exist_ok=True)
    encoder = encoder.to(device)
    uncond = encode_captions([""], encoder, tokenizer, device)[0].float().cpu().numpy()
    np.save(cache / "uncond.npy", uncond.astype(np.float16))
    return _resumable_fill(
        cache / "text.npy", (len(captions), tokenizer.model_max_length, TEXT_DIM), 256,
        lambda a, b: encode_captions(captions[a:b], encoder, tokenizer, device).float().cpu().numpy(),
        "text embeddings", progress)


def precompute_moments(cache: Path, images: np.ndarray, vae, device="cpu", progress: bool = True) -> np.ndarray:
    """Posterior moments ``[N, 2*C, h, w]`` (mean, logvar) of every image under ``vae`` (float16)."""
    from stepsaver.shrink.autoencoder import images_to_tensor

    cache.mkdir(parents=True, exist_ok=True)
    vae = vae.to(device).eval()
    c = vae.config.latent_channels
    side = images.shape[1] // 2 ** (len(vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def fill(a: int, b: int) -> np.ndarray:
        dist = vae.encode(images_to_tensor(images[a:b]).to(device)).latent_dist
        return torch.cat([dist.mean, dist.logvar], 1).float().cpu().numpy()

    return _resumable_fill(cache / "moments.npy", (len(images), 2 * c, side, side), 256, fill,
                           "VAE moments", progress)


def folder_digest(folder: Path) -> str:
    """Short content hash of a model folder (keys the moments cache to the exact VAE weights)."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).rglob("*")):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def write_cache_meta(cache: Path, meta: dict) -> None:
    (cache / "meta.json").write_text(json.dumps(meta, indent=2))
