"""Sample grids: generated images (optionally beside the real scene) with their prompts."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw


def save_grid(path: str | Path, images: np.ndarray, prompts: Sequence[str], real: np.ndarray | None = None,
              cols: int = 4, scale: int = 3) -> Path:
    """Write a PNG grid; each cell is the (real | generated) pair upscaled, captioned below."""
    n, h, w, _ = images.shape
    pair_w = w * scale * (2 if real is not None else 1)
    cap_h = 44
    rows = (n + cols - 1) // cols
    canvas = Image.new("RGB", (cols * (pair_w + 8), rows * (h * scale + cap_h + 8)), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, cols)
        x, y = c * (pair_w + 8), r * (h * scale + cap_h + 8)
        tiles = ([real[i]] if real is not None else []) + [images[i]]
        for k, tile in enumerate(tiles):
            im = Image.fromarray(tile).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(im, (x + k * w * scale, y))
        text = "\n".join(textwrap.wrap(prompts[i], width=pair_w // 6)[:3])
        draw.text((x, y + h * scale + 2), text, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def render_eval_grid(pipe, png: str | Path, n: int = 16, steps: int = 30, guidance: float = 5.0, seed: int = 0,
                     font: str | None = None, guidance_rescale: float = 0.0, **call_kwargs: Any) -> Path:
    """Generate the first ``n`` held-out (eval split) scene prompts, each beside its real scene.

    ``call_kwargs`` go to the pipeline (tiny-flux's true CFG needs ``negative_prompt`` and
    ``true_cfg_scale``; FluxPipeline's ``guidance_scale`` is for guidance-distilled models).
    """
    from stepsaver.generation import generate_images
    from stepsaver.scenes import SceneGenerator

    gen = SceneGenerator(seed=seed, split="eval", font=font)
    scenes = [gen.sample(i) for i in range(n)]
    prompts = [s.caption for s in scenes]
    results = generate_images(pipe, prompts, steps=steps, seeds=seed, guidance=guidance,
                              guidance_rescale=guidance_rescale, output_type="np", **call_kwargs)
    images = np.stack([r.image for r in results])
    real = np.stack([gen.render(s) for s in scenes])
    return save_grid(png, (images * 255).round().astype(np.uint8), prompts, real=real)


def write_scene_preview(out: str | Path, n: int, seed: int = 0, split: str = "train", font: str | None = None,
                        progress: bool = True) -> dict:
    """Render ``n`` captioned scenes into ``out`` (``images.npy``, ``scenes.jsonl``) plus a 16-scene grid."""
    from stepsaver.errors import StepsaverError
    from stepsaver.scenes import load_scene_set, write_scene_set

    if n <= 0:
        raise StepsaverError(f"--n must be positive, got {n}")
    if split not in ("train", "eval"):
        raise StepsaverError(f"--split must be 'train' or 'eval', got {split!r}")
    out = Path(out)
    write_scene_set(out, n, seed=seed, split=split, font=font, progress=progress)
    images, scenes = load_scene_set(out)
    k = min(16, n)
    grid = save_grid(out / "grid.png", np.asarray(images[:k]), [s.caption for s in scenes[:k]])
    return {"scenes": n, "split": split, "seed": seed, "folder": str(out), "grid": str(grid),
            "first_caption": scenes[0].caption}


def plot_loss(history: Sequence[dict], png: str | Path, title: str = "training loss") -> Path:
    """Plot the running training loss (and learning rate) of a ``train-model`` history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    ax.plot(steps, [h["loss"] for h in history], label="loss (EMA of batches)")
    ax.set_xlabel("step")
    ax.set_ylabel("weighted MSE")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [h["lr"] for h in history], color="tab:orange", alpha=0.6, label="learning rate")
    ax2.set_ylabel("learning rate")
    ax.set_title(title)
    fig.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
