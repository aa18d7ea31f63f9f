"""Tiny random diffusers pipelines in the SD-1.5 and SDXL layouts, built locally (never downloaded).

The CLIP tokenizers get a character-level vocabulary written to a temp folder: enough to tokenise
any ASCII prompt, so the real ``CLIPTokenizer`` loading and encoding code runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]  # the checkout: tests/ sits in it, ../shared beside it


def _clip_tokenizer(folder: Path):
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


def _clip_text(vocab_size: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=2, max_position_embeddings=16, projection_dim=32,
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=32)


def tiny_sd15(folder: Path) -> Path:
    """Save a random StableDiffusionPipeline (SD-1.5 layout, 32 px) to ``folder``."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tok = _clip_tokenizer(folder / "_tok")
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                          clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_clip_text(len(tok)), tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder / "sd15")
    return folder / "sd15"


def tiny_sdxl(folder: Path) -> Path:
    """Save a random StableDiffusionXLPipeline (two text encoders, added_cond_kwargs) to ``folder``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tok = _clip_tokenizer(folder / "_tok")
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=4, norm_num_groups=8, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
                                transformer_layers_per_block=(1, 1))
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=_clip_text(len(tok)), tokenizer=tok,
                                     text_encoder_2=_clip_text(len(tok), projection=True), tokenizer_2=tok,
                                     unet=unet, scheduler=sched)
    pipe.save_pretrained(folder / "sdxl")
    return folder / "sdxl"


def _t5_tokenizer():
    """A T5 (Unigram) tokenizer over single characters, built in memory: no sentencepiece file, no download."""
    import string

    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces += [(c, -3.0) for c in chars] + [("\u2581" + c, -3.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=16)


def tiny_pixart(folder: Path) -> Path:
    """Save a random PixArtAlphaPipeline (transformer denoiser, T5 text encoder, 32 px) to ``folder``.

    Call it with ``use_resolution_binning=False`` (the bins exist only for the real 256-1024 px sizes) and
    ``clean_caption=False`` (caption cleaning needs bs4/ftfy); ``max_sequence_length=16`` keeps T5 short.
    """
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok = _t5_tokenizer()
    text = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)).eval()
    transformer = PixArtTransformer2DModel(sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=3, caption_channels=32, in_channels=4,
                                           cross_attention_dim=24, out_channels=8, attention_bias=True,
                                           activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                           norm_type="ada_norm_single", norm_elementwise_affine=False,
                                           norm_eps=1e-6)
    sched = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)
    pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=text, vae=_vae(), transformer=transformer.eval(),
                               scheduler=sched)
    pipe.save_pretrained(folder / "pixart")
    return folder / "pixart"


# ---- synthetic step labels (Predict) ------------------------------------------------------
GRID = list(range(10, 101, 10))


def synthetic_rows(n: int = 240, seed: int = 0) -> list[dict]:
    """Label rows whose converged label is decided by the prompt's object count (learnable)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = ["cat", "dog", "apple", "car", "tree", "boat", "star", "moon", "cake", "bell", "fish", "leaf"]
    rows = []
    for i in range(n):
        k = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))  # unequal classes
        objs = rng.choice(words, size=k, replace=False)
        prompt = " and ".join(f"a {o}" for o in objs) + f" on background {i}"
        conv = {1: 10, 2: 30, 3: 60}[k]
        ref = [0.5 if s < conv else 0.99 for s in GRID]
        rows.append({"prompt": prompt, "steps": GRID, "ssim_next": [0.9] * 9, "ssim_ref": ref})
    return rows
