"""Sizes of the embedded model: a small AutoencoderKL and a lean UNet2DConditionModel.

The sizes were chosen by timing on the 2-core CPU this project runs on (see docs/embedded-model.md):
the autoencoder maps 64x64x3 scenes to 16x16x4 latents (an 8x8x4 latent measured 20 dB and
blobs, 16x16x4 keeps emoji recognisable), and keeps its full-resolution stage at 16 channels
because full-resolution convolutions dominate CPU time. The UNet follows DeciDiffusion's lean
idea of spending attention only where it pays: no attention at 16x16 (it doubled the training
step time on the CPU), cross- and self-attention at 8x8 and 4x4 (enough for a 3x3 grid of
positions), one resnet per level. 7.2 M parameters keep the shipped fp16 folder under 20 MB.
"""

from __future__ import annotations

from typing import Any

from stepsaver.text import TEXT_DIM


def vae_config() -> dict[str, Any]:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 48, 96),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        mid_block_add_attention=False,
    )


def unet_config() -> dict[str, Any]:
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=16,
    )
