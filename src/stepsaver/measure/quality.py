"""Full-reference image quality: PSNR and SSIM from torchmetrics.

These compare a cheaper generation with the expensive one it replaces (same prompt and seed),
and SSIM is the same function the Predict labeller uses for consecutive renders, so the numbers
in the benchmarks and in the labels agree by construction.
"""

from __future__ import annotations

import numpy as np
import torch

from stepsaver.errors import StepsaverError


def to_float_nchw(images) -> torch.Tensor:
    """PIL images, NHWC uint8 arrays or NCHW tensors -> float NCHW in [0, 1]."""
    if isinstance(images, list):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    if isinstance(images, np.ndarray):
        t = torch.from_numpy(np.array(images))
        if t.dim() == 3:
            t = t[None]
        if t.shape[-1] == 3:
            t = t.permute(0, 3, 1, 2)
    else:
        t = images if images.dim() == 4 else images[None]
    return t.float() / 255.0 if t.dtype == torch.uint8 else t.float()


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = to_float_nchw(a), to_float_nchw(b)
    if x.shape != y.shape:
        raise StepsaverError(f"images to compare differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x, y


def psnr(a, b, per_image: bool = True) -> torch.Tensor:
    """PSNR in dB (data range 1): per image, or of the whole batch's pooled MSE (``per_image=False``,
    what a training log reports for a batch)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    x, y = _pair(a, b)
    if not per_image:
        return peak_signal_noise_ratio(x, y, data_range=1.0)
    return peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(a, b) -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11, sigma 1.5, data range 1), computed in float64.

    The labelling rules decide near 1 (tau 0.99, first decline between consecutive renders),
    where float32 SSIM is off by up to 1e-4; float64 makes those decisions exact to ~1e-12.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    x, y = _pair(a, b)
    return structural_similarity_index_measure(x.double(), y.double(), data_range=1.0, reduction="none")
