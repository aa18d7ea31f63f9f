"""tiny-flux: the second embedded text-to-image model, in the Flux layout users serve today.

Issue 19 needs a model on which every diffusers cache (FirstBlockCache, MagCache, TaylorSeer,
PAB, FasterCache) runs; of the layouts we can build, Flux is the one. Its parts:

* denoiser: diffusers' ``FluxTransformer2DModel``, small (:func:`tiny_flux_config`);
* latents: the shipped autoencoder of ``tiny`` (64x64 RGB -> 16x16x4), packed 2x2 into 64 tokens
  of 16 channels by FluxPipeline's own ``_pack_latents``; its config carries the
  ``scaling_factor``/``shift_factor`` measured on the training latents (:func:`latent_stats`);
* text: the MiniLM-L6 we ship, for both Flux inputs: the token sequence (``joint_attention_dim``
  384) and the attention-masked mean of that sequence (``pooled_projection_dim`` 384);
* sampler: ``FlowMatchEulerDiscreteScheduler`` with the model's static shift (:data:`FLUX_SHIFT`).

:class:`MiniLMFluxPipeline` is FluxPipeline with only the prompt encoding replaced: FluxPipeline
asks CLIP for a pooled output and T5 for the sequence, and MiniLM has no pooler (its
``_get_clip_prompt_embeds`` fails on it). Denoising, packing, true CFG
(``negative_prompt`` + ``true_cfg_scale``; the model has no guidance embedding) and decoding are
FluxPipeline's own code, so caches and hooks see a stock Flux pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import FluxPipeline

from stepsaver.text import TEXT_DIM, encode_captions

__all__ = ["FLUX_MAX_TOKENS", "FLUX_SHIFT", "MiniLMFluxPipeline", "flux_scheduler_config", "latent_stats",
           "masked_mean", "tiny_flux_config", "token_mask"]

FLUX_MAX_TOKENS = 48
"""Prompts are padded to 48 tokens (the UNet pads to 40).

Measured on the scene grammar: at 40 tokens 205 of the 40,000 training captions and 5 of 2,000
held-out ones lose their tail (often the background colour); the longest of those 42,000 is 46
tokens ([CLS] and [SEP] included). 48 fits every one of them. The grammar's theoretical worst
case (four objects, each with a size word, a three-piece name and a five-token position) is 54,
which no sampled caption came near; 64 would cover it at ~14% more transformer work per step,
because FluxPipeline sends padding tokens through every block unmasked.
"""

FLUX_SHIFT = 1.0
"""Static timestep shift of the scheduler (no resolution-dependent ``mu``).

Flux shifts sigmas towards noise because large images keep most of their content at high noise
levels; SD3 derived the shift as sqrt(m / n) from the number of latent pixels relative to its
unshifted 256x256 base. Our 16x16x4 latent is smaller than that base, so no shift (1.0) with
logit-normal training times (SD3's best unshifted choice) is the closest match. Training draws
its sigmas through the same shift, so changing it here changes both.
"""


def tiny_flux_config() -> dict[str, Any]:
    """The tiny-flux transformer: width 128 (4 heads of 32), 4 double-stream + 2 single-stream blocks.

    3.07 M parameters. Chosen by timing training steps at one CPU thread, batch 64, 48 text
    tokens + 64 image tokens (the budget here: ~2.5 CPU hours a session, resumable across sessions):

    ======================  ========  ===========
    config                  params    s / step
    ======================  ========  ===========
    d128, 2 double+4 single  2.38 M    1.42-1.62
    d128, 4 double+2 single  3.07 M    1.39-1.42
    d96, 2 double+4 single   1.37 M    0.83-0.93
    d160, 2 double+3 single  3.28 M    1.50-1.64
    ======================  ========  ===========

    Per token a double block and a single block cost the same (~12 d^2 multiply-adds: the
    double block's second set of weights serves the text tokens, its AdaLN runs once per sample),
    so trading single blocks for double ones buys 30% more parameters, and text-specific weights
    for the prompt-following the adherence target asks for, at no cost per step. d96 would fit
    ~9k steps into one session but has less than half the capacity, and the UNet needed 12.5k
    steps at 7.2 M parameters to reach 0.77 adherence; capacity is the scarcer resource, and a
    resumable run can spend more than one session. Head size 32 = RoPE axes (4, 14, 14): the
    first axis is the unused Flux "frame" index (always 0), the others the 8x8 token grid.
    """
    return dict(
        patch_size=1,
        in_channels=16,  # 4 latent channels x 2x2 packing
        num_layers=4,
        num_single_layers=2,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=False,  # true CFG, no guidance distillation
        axes_dims_rope=(4, 14, 14),
    )


def flux_scheduler_config(shift: float = FLUX_SHIFT) -> dict[str, Any]:
    """FlowMatchEulerDiscreteScheduler kwargs shared by training and the saved pipeline."""
    return dict(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)


def token_mask(texts: Sequence[str], tokenizer) -> torch.Tensor:
    """The attention mask ``[N, T]`` of ``texts`` as :func:`stepsaver.text.encode_captions` pads them."""
    tok = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt")
    return tok.attention_mask


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [N, T, D]`` over the tokens ``mask [N, T]`` keeps ([CLS] and [SEP] included).

    This is sentence-transformers' mean pooling, the pooled sentence vector MiniLM was trained to
    give; padding is left out so a prompt pools the same whatever length it is padded to.
    """
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def latent_stats(moments: Any, chunk: int = 4096) -> tuple[float, float]:
    """``(shift_factor, scaling_factor)`` of the latents the posterior moments ``[N, 2C, h, w]`` sample.

    Flux normalises latents as ``(z - shift) * scale``; with ``shift`` the mean and ``scale`` one
    over the standard deviation of ``z = mean + exp(logvar / 2) * eps`` over every training image,
    channel and position, the model's inputs have zero mean and unit variance. Computed exactly
    from the moments (E[z] = E[mean], E[z^2] = E[mean^2 + exp(logvar)]), not from one noisy draw.
    """
    import numpy as np

    total = sq = count = 0.0
    for a in range(0, len(moments), chunk):
        m = np.asarray(moments[a:a + chunk], dtype=np.float64)
        mean, logvar = np.split(m, 2, axis=1)
        total += mean.sum()
        sq += (mean**2 + np.exp(np.clip(logvar, -30, 20))).sum()
        count += mean.size
    mu = total / count
    std = float(np.sqrt(sq / count - mu**2))
    return float(mu), 1.0 / std


class MiniLMFluxPipeline(FluxPipeline):
    """FluxPipeline whose prompts are encoded by MiniLM (one encoder for sequence and pooled vector).

    Only :meth:`encode_prompt` is replaced. The second text encoder and tokenizer (T5's slots)
    stay empty, hence optional here; a call without ``height``/``width`` draws the size the
    autoencoder was built for (64x64) rather than FluxPipeline's 1024-pixel default.
    """

    _optional_components = [*FluxPipeline._optional_components, "text_encoder_2", "tokenizer_2"]

    def __init__(self, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                 image_encoder=None, feature_extractor=None) -> None:
        super().__init__(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
                         image_encoder=image_encoder, feature_extractor=feature_extractor)
        if vae is not None:
            self.default_sample_size = vae.config.sample_size // self.vae_scale_factor

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        prompt_2: str | list[str] | None = None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int = 512,
        lora_scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(token sequence [N, T, 384], pooled [N, 384], text_ids [T, 3])`` as FluxPipeline expects.

        The sequence is exactly what training precomputed (:func:`stepsaver.text.encode_captions`,
        padded to the tokenizer's length, the one the model was trained with, so
        ``max_sequence_length`` and ``prompt_2`` are ignored); the pooled vector is its
        :func:`masked_mean`. Passed-in embeddings are used as they are, as in FluxPipeline.
        """
        device = device or self._execution_device
        if prompt_embeds is None:
            texts = [prompt] if isinstance(prompt, str) else list(prompt)
            seq = encode_captions(texts, self.text_encoder, self.tokenizer, device)
            pooled = masked_mean(seq, token_mask(texts, self.tokenizer).to(device))
            dtype = self.transformer.dtype
            prompt_embeds = seq.to(dtype).repeat_interleave(num_images_per_prompt, dim=0)
            pooled_prompt_embeds = pooled.to(dtype).repeat_interleave(num_images_per_prompt, dim=0)
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=prompt_embeds.dtype)
        return prompt_embeds, pooled_prompt_embeds, text_ids
