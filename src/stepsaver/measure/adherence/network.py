"""The adherence classifier: a small CNN reading background colour and, per object, absent or position."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stepsaver.errors import StepsaverError
from stepsaver.measure.adherence.captions import (
    BACKGROUND_NAMES,
    BG_INDEX,
    INPUT_SIZE,
    OBJ_INDEX,
    OBJECT_NAMES,
    POS_INDEX,
    POSITION_NAMES,
)
from stepsaver.scenes import POSITIONS, Scene


# ---- the classifier ----------------------------------------------------------------------------
def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class AdherenceNet(nn.Module):
    """Six 3x3 convolutions down to an 8x8 map, then three heads.

    Objects: a learned soft window per grid cell (initialised as a Gaussian on the cell centre)
    pools the map into 9 cell vectors; a shared linear layer scores "object o is centred here", and
    a per-object "absent" score from the global average completes the 10-way logits. Sharing the
    object classifier across cells means each object is learned once, not nine times.
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 128), n_objects: int = len(OBJECT_NAMES),
                 n_backgrounds: int = len(BACKGROUND_NAMES)) -> None:
        super().__init__()
        w0, w1, w2 = widths
        self.widths = tuple(widths)
        self.features = nn.Sequential(
            _conv(3, w0, 2), _conv(w0, w0, 1),     # 32x32
            _conv(w0, w1, 2), _conv(w1, w1, 1),    # 16x16
            _conv(w1, w2, 2), _conv(w2, w2, 1),    # 8x8
        )
        side = INPUT_SIZE // 8
        grid = (torch.arange(side, dtype=torch.float32) + 0.5) * 8  # feature-cell centres in pixels
        yy, xx = torch.meshgrid(grid, grid, indexing="ij")
        init = torch.stack([-((xx - cx * INPUT_SIZE) ** 2 + (yy - cy * INPUT_SIZE) ** 2) / (2 * 10.0**2)
                            for cx, cy in POSITIONS.values()]).flatten(1)
        self.cell_window = nn.Parameter(init)  # (9, 64) log-weights over the 8x8 map
        self.object_here = nn.Linear(w2, n_objects)
        self.absent = nn.Linear(w2, n_objects)
        self.empty = nn.Linear(w2, 1)  # training-only: "no object centred in this cell"
        self.background = nn.Linear(w2, n_backgrounds)

    def forward(self, x: torch.Tensor, with_cells: bool = False):
        """``x``: (N, 3, 64, 64) floats in [0, 1] -> (background logits (N, 12), object logits (N, 107, 10)).

        ``with_cells`` also returns per-cell logits (N, 9, 1 + 107: empty or which object), the
        training signal that makes objects compete with each other in a cell rather than only
        with "absent" (training first sits at "everything absent" for a few hundred steps).
        """
        f = self.features(x - 0.5).flatten(2)                              # (N, C, 64)
        pooled = f.mean(2)
        cells = torch.einsum("ncl,pl->npc", f, self.cell_window.softmax(1))  # (N, 9, C)
        here = self.object_here(cells)                                     # (N, 9, objects)
        objects = torch.cat([self.absent(pooled)[..., None], here.transpose(1, 2)], dim=2)  # (N, objects, 10)
        if with_cells:
            return self.background(pooled), objects, torch.cat([self.empty(cells), here], dim=2)
        return self.background(pooled), objects


def targets_of(scenes: Sequence[Scene]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class targets: background (N,), per object (N, 107; 0 = absent), per cell (N, 9; 0 = empty)."""
    bg = torch.tensor([BG_INDEX[s.background] for s in scenes])
    obj = torch.zeros(len(scenes), len(OBJECT_NAMES), dtype=torch.long)
    cell = torch.zeros(len(scenes), len(POSITION_NAMES), dtype=torch.long)
    for i, s in enumerate(scenes):
        for o in s.objects:
            obj[i, OBJ_INDEX[o.name]] = 1 + POS_INDEX[o.position]
            cell[i, POS_INDEX[o.position]] = 1 + OBJ_INDEX[o.name]
    return bg, obj, cell


# ---- images in ---------------------------------------------------------------------------------
def as_batch(images) -> torch.Tensor:
    """PIL images, (N,)H,W,3 uint8 arrays or (N,)3,H,W tensors -> float (N, 3, 64, 64) in [0, 1]."""
    try:
        if isinstance(images, list | tuple):
            images = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
        if isinstance(images, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(images))
            if t.dim() == 3:
                t = t[None]
            if t.dim() == 4 and t.shape[-1] in (1, 3, 4) and t.shape[1] not in (1, 3):
                t = t.permute(0, 3, 1, 2)
        elif isinstance(images, torch.Tensor):
            t = images if images.dim() != 3 else images[None]
        else:
            raise TypeError
    except (TypeError, ValueError):
        raise StepsaverError(
            "images must be PIL images, an (N, H, W, 3) uint8 array or an (N, 3, H, W) tensor"
        ) from None
    if t.dim() != 4 or t.shape[1] != 3 or t.shape[2] != t.shape[3]:
        raise StepsaverError(
            f"images have shape {tuple(t.shape)}; pass square RGB images as (N, 64, 64, 3) uint8 or (N, 3, 64, 64)"
        )
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    if t.shape[-1] != INPUT_SIZE:  # other square sizes (e.g. a 512 px pipeline) are read at 64 px
        t = F.interpolate(t, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return t.clamp(0, 1)
