"""Sample grids: generated images (optionally beside the real scene) with their prompts."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

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
