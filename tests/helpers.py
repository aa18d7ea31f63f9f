"""Tiny random diffusers pipelines in the SD-1.5 and SDXL layouts, built locally (never downloaded).

The CLIP tokenizers get a character-level vocabulary written to a temp folder: enough to tokenise
any ASCII prompt, so the real ``CLIPTokenizer`` loading and encoding code runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
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
    return _tiny_vae()


def tiny_sd15(folder: Path) -> Path:
    """Save a random StableDiffusionPipeline (SD-1.5 layout, 32 px) to ``folder``."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(0)
    tok = _clip_tokenizer(folder / "_tok")
    unet, sched = _sd_unet(), _sd_scheduler()  # the UNet draws its weights before the VAE, as it always did
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_clip_text(len(tok)), tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder / "sd15")
    return folder / "sd15"


def tiny_sdxl(folder: Path) -> Path:
    """Save a random StableDiffusionXLPipeline (two text encoders, added_cond_kwargs) to ``folder``."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**_sdxl_components(_clip_tokenizer(folder / "_tok")))
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


# ---- in-memory tiny pipelines of every family the Skip matrix covers ---------------------------
# Built in code (never downloaded, never saved), each with torch.manual_seed(0) so two builds are equal
# weight for weight. Latents are 16x16 (32 px images through the 2x VAE) unless noted.

def _memory_clip_tokenizer():
    return _clip_tokenizer(Path("."))  # the folder is not written: the vocabulary lives in memory


def _tiny_vae(**overrides):
    """The 2x AutoencoderKL of ``_vae`` with config overrides (latent channels, SD3/Flux shift factors)."""
    from diffusers import AutoencoderKL

    config = dict(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=8, sample_size=32)
    config.update(overrides)
    return AutoencoderKL(**config)


def _sd_unet(in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16,
                                in_channels=in_channels, out_channels=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8)


def _sd_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                         clip_sample=False, set_alpha_to_one=False)


def _sd_components(in_channels: int = 4) -> dict:
    torch.manual_seed(0)
    tok = _memory_clip_tokenizer()
    return dict(vae=_vae(), text_encoder=_clip_text(len(tok)), tokenizer=tok, unet=_sd_unet(in_channels),
                scheduler=_sd_scheduler(), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)


def build_sd15():
    """StableDiffusionPipeline (SD-1.5 layout, the config of :func:`tiny_sd15`), in memory, DDIM."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**_sd_components())


def build_sd_img2img():
    from diffusers import StableDiffusionImg2ImgPipeline

    return StableDiffusionImg2ImgPipeline(**_sd_components())


def build_sd_inpaint():
    """StableDiffusionInpaintPipeline with the 9-channel UNet (latents + mask + masked-image latents)."""
    from diffusers import StableDiffusionInpaintPipeline

    return StableDiffusionInpaintPipeline(**_sd_components(in_channels=9))


def build_sd_controlnet():
    """StableDiffusionControlNetPipeline; the ControlNet's zero convolutions get random weights so it matters."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    components = _sd_components()
    torch.manual_seed(1)
    controlnet = ControlNetModel(block_out_channels=(16, 32), layers_per_block=1, in_channels=4,
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=32,
                                 conditioning_embedding_out_channels=(16, 32), attention_head_dim=4,
                                 norm_num_groups=8)
    with torch.no_grad():
        for module in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            torch.nn.init.normal_(module.weight, std=0.05)
    return StableDiffusionControlNetPipeline(controlnet=controlnet.eval(), **components)


def _sdxl_components(tok=None) -> dict:
    """SDXL's parts (``tok``: a tokenizer saved to disk for pipelines that are saved; in memory otherwise)."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    tok = _memory_clip_tokenizer() if tok is None else tok
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=4, norm_num_groups=8, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
                                transformer_layers_per_block=(1, 1))
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    return dict(vae=_vae(), text_encoder=_clip_text(len(tok)), tokenizer=tok,
                text_encoder_2=_clip_text(len(tok), projection=True), tokenizer_2=tok, unet=unet, scheduler=sched)


def build_sdxl():
    """StableDiffusionXLPipeline (the config of :func:`tiny_sdxl`), in memory, Euler."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(**_sdxl_components())


def build_sdxl_img2img():
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return StableDiffusionXLImg2ImgPipeline(**_sdxl_components(), requires_aesthetics_score=False)


def _t5_text(tok, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)).eval()


def _pixart_components() -> dict:
    from diffusers import DDIMScheduler, PixArtTransformer2DModel

    torch.manual_seed(0)
    tok = _t5_tokenizer()
    text = _t5_text(tok)
    transformer = PixArtTransformer2DModel(sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=3, caption_channels=32, in_channels=4,
                                           cross_attention_dim=24, out_channels=8, attention_bias=True,
                                           activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                           norm_type="ada_norm_single", norm_elementwise_affine=False,
                                           norm_eps=1e-6)
    sched = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)
    return dict(tokenizer=tok, text_encoder=text, vae=_vae(), transformer=transformer.eval(), scheduler=sched)


def build_pixart_alpha():
    """PixArtAlphaPipeline (the config of :func:`tiny_pixart`); call with use_resolution_binning=False,
    clean_caption=False, max_sequence_length=16."""
    from diffusers import PixArtAlphaPipeline

    return PixArtAlphaPipeline(**_pixart_components())


def build_pixart_sigma():
    from diffusers import PixArtSigmaPipeline

    return PixArtSigmaPipeline(**_pixart_components())


def build_sd3():
    """StableDiffusion3Pipeline: two projected CLIPs (pooled 32 + 32), a T5 (joint dim 32), FlowMatchEuler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tok = _memory_clip_tokenizer()
    t5_tok = _t5_tokenizer()
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip_text(len(tok), projection=True), tokenizer=tok,
        text_encoder_2=_clip_text(len(tok), projection=True), tokenizer_2=tok,
        text_encoder_3=_t5_text(t5_tok), tokenizer_3=t5_tok)


def build_flux():
    """FluxPipeline: tiny CLIP (pooled 32) + T5 (joint dim 32), 1+1 layers, 16x16 latents packed to 8x8 tokens.

    Call with ``max_sequence_length=16``; ``negative_prompt`` + ``true_cfg_scale > 1`` runs true CFG
    (two transformer calls per step).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    tok = _memory_clip_tokenizer()
    t5_tok = _t5_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    return FluxPipeline(transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(),
                        vae=_tiny_vae(shift_factor=0.0609, scaling_factor=1.5035),
                        text_encoder=_clip_text(len(tok)), tokenizer=tok,
                        text_encoder_2=_t5_text(t5_tok), tokenizer_2=t5_tok)


def build_dit():
    """DiTPipeline (class-conditional, 1000 classes, learned sigma), 16x16 latents, DDIM."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(sample_size=16, num_layers=2, patch_size=4, attention_head_dim=8,
                                        num_attention_heads=2, in_channels=4, out_channels=8)
    return DiTPipeline(transformer=transformer.eval(), vae=_vae(), scheduler=DDIMScheduler())


def _pixel_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=3,
                       out_channels=3, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)


def build_ddpm():
    """DDPMPipeline: unconditional UNet2DModel on 16x16 pixels (no CFG)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    torch.manual_seed(0)
    return DDPMPipeline(unet=_pixel_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000))


def build_ddim():
    from diffusers import DDIMPipeline, DDIMScheduler

    torch.manual_seed(0)
    return DDIMPipeline(unet=_pixel_unet(), scheduler=DDIMScheduler(num_train_timesteps=1000))


def build_text_to_video():
    """TextToVideoSDPipeline (UNet3DConditionModel); latents (B, 4, frames, 16, 16)."""
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    torch.manual_seed(0)
    tok = _memory_clip_tokenizer()
    unet = UNet3DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8)
    return TextToVideoSDPipeline(vae=_vae(), text_encoder=_clip_text(len(tok)), tokenizer=tok, unet=unet.eval(),
                                 scheduler=_sd_scheduler())


def build_i2vgenxl():
    """I2VGenXLPipeline (I2VGenXLUNet, CLIP vision encoder). The VAE's posterior std is ~3e-7 (logvar -30),
    so the image latents it samples with the global RNG are all but deterministic across batch layouts."""
    from diffusers import I2VGenXLPipeline
    from diffusers.models.unets import I2VGenXLUNet
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    tok = _memory_clip_tokenizer()
    unet = I2VGenXLUNet(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4,
                        out_channels=4, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=32,
                        attention_head_dim=4, num_attention_heads=None, norm_num_groups=8)
    vae = _vae()
    with torch.no_grad():  # quant_conv's second half is the log-variance
        vae.quant_conv.weight[4:] = 0.0
        vae.quant_conv.bias[4:] = -30.0
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        intermediate_size=37, patch_size=4)).eval()
    return I2VGenXLPipeline(vae=vae, text_encoder=_clip_text(len(tok)), tokenizer=tok, image_encoder=image_encoder,
                            feature_extractor=CLIPImageProcessor(crop_size=32, size=32), unet=unet.eval(),
                            scheduler=_sd_scheduler())


def build_ldm_text_to_image():
    """LDMTextToImagePipeline (LDMBert text encoder, 77 tokens). It sizes latents height // 8: call at 128 px
    for 16x16 latents; the 2x VAE then decodes them to 32 px."""
    from diffusers import LDMTextToImagePipeline
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    torch.manual_seed(0)
    tok = _memory_clip_tokenizer()
    n = len(tok)
    bert = LDMBertModel(LDMBertConfig(vocab_size=n, d_model=32, encoder_ffn_dim=37, encoder_layers=2,
                                      encoder_attention_heads=4, head_dim=8, max_position_embeddings=77,
                                      pad_token_id=n - 1, bos_token_id=n - 2, eos_token_id=n - 1)).eval()
    return LDMTextToImagePipeline(vqvae=_vae(), bert=bert, tokenizer=tok, unet=_sd_unet(), scheduler=_sd_scheduler())


def tiny_lora_state_dict(seed: int, rank: int = 4) -> dict:
    """A random LoRA for the attention projections of :func:`build_sd15`'s UNet, as the ``unet.``-prefixed
    dict ``load_lora_weights`` takes.

    Made through peft (``add_adapter`` with non-zero B) on a throwaway UNet of the same layout and read back
    with ``get_peft_model_state_dict``.
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = _sd_unet()
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(config, adapter_name="tmp")
    return {f"unet.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(unet, adapter_name="tmp").items()}


# ---- a pipeline stand-in for the service tests --------------------------------------------------
class GatedPipe:
    """A real pipeline whose calls first wait for ``gate``, recording each call's prompts.

    Holds a worker busy on demand (queue bounds, cancellation, timeouts). ``open_gate`` says
    whether calls pass until a test closes the gate; ``wait_s`` bounds every wait.
    """

    def __init__(self, real, open_gate: bool = True, wait_s: float = 30.0) -> None:
        import threading

        self.real, self.gate, self.calls, self.wait_s = real, threading.Event(), [], wait_s
        if open_gate:
            self.gate.set()
        self.scheduler = real.scheduler

    def set_progress_bar_config(self, **kw):
        pass

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __call__(self, prompts, **kw):
        self.calls.append(list(prompts))
        self.gate.wait(self.wait_s)
        self.real.scheduler = self.scheduler
        return self.real(prompts, **kw)

    def prompts(self):
        return [p for call in self.calls for p in call]



@dataclasses.dataclass
class CompileStats:
    graphs: int = 0  # graphs dynamo handed to the backend (first compile + every recompile)
    runs: int = 0  # calls of a compiled graph: the network runs


def counting_backend():
    """A dynamo backend that counts graphs and their runs; it runs each graph eagerly.

    Dynamo's tracing, guards and recompiles are the real ones; only Inductor's code generation is
    left out (minutes on two cores), unless ``STEPSAVER_MATRIX_INDUCTOR=1``.
    """
    stats = CompileStats()

    def backend(gm, example_inputs):
        stats.graphs += 1
        if os.environ.get("STEPSAVER_MATRIX_INDUCTOR") == "1":
            from torch._inductor.compile_fx import compile_fx

            fn = compile_fx(gm, example_inputs)
        else:
            fn = gm.forward

        def run(*args):
            stats.runs += 1
            return fn(*args)
        return run

    return stats, backend


@contextlib.contextmanager
def one_torch_thread():
    """Torch on one thread for the block (deterministic reductions; no oversubscription on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
