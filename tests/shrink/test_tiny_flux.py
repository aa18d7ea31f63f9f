"""tiny-flux: MiniLM prompt encoding, the FluxPipeline subclass with true CFG, a toy resumable training run."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from safetensors.torch import load_file

from stepsaver.errors import StepsaverError
from stepsaver.flux import MiniLMFluxPipeline, flux_scheduler_config, masked_mean, token_mask
from stepsaver.shrink.train_flux import SHIPPED_VAE, FluxTrainConfig, train_flux
from stepsaver.text import encode_captions, load_text_encoder

TOY_TRANSFORMER = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                       axes_dims_rope=(4, 6, 6))


@pytest.fixture(scope="module")
def pipe():
    """A MiniLMFluxPipeline on the shipped autoencoder with a random toy transformer."""
    from stepsaver.flux import tiny_flux_config

    torch.manual_seed(0)
    encoder, tokenizer = load_text_encoder(max_tokens=48)
    vae = AutoencoderKL.from_pretrained(SHIPPED_VAE)
    vae.register_to_config(shift_factor=1.7, scaling_factor=0.27)
    transformer = FluxTransformer2DModel(**{**tiny_flux_config(), **TOY_TRANSFORMER})
    p = MiniLMFluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**flux_scheduler_config()), vae=vae,
                           text_encoder=encoder, tokenizer=tokenizer, text_encoder_2=None, tokenizer_2=None,
                           transformer=transformer)
    p.set_progress_bar_config(disable=True)
    return p


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_prompt_encoding_is_the_training_cache_and_pools_only_real_tokens(pipe):
    prompts = ["a cat on a blue background",
               "a small fox in the top left corner, a big tractor on the right and a moon at the bottom, "
               "teal background"]
    seq, pooled, text_ids = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=2)
    assert seq.shape == (4, 48, 384) and pooled.shape == (4, 384) and text_ids.shape == (48, 3)
    cached = encode_captions(prompts, pipe.text_encoder, pipe.tokenizer)  # what precompute_text stores
    torch.testing.assert_close(seq[::2], cached)
    mask = token_mask(prompts, pipe.tokenizer)
    assert mask.sum(1).tolist()[0] == len(pipe.tokenizer(prompts[0])["input_ids"])
    for i in range(2):  # the mean over the real tokens only ([CLS] ... [SEP])
        n = int(mask[i].sum())
        torch.testing.assert_close(pooled[2 * i], cached[i, :n].mean(0))
    # padding-independent: the same prompt padded to 64 tokens pools to the same vector
    encoder64, tok64 = load_text_encoder(max_tokens=64)
    seq64 = encode_captions(prompts, encoder64, tok64)
    torch.testing.assert_close(masked_mean(seq64, token_mask(prompts, tok64)), pooled[::2], atol=1e-5, rtol=1e-4)
    # precomputed embeddings pass through untouched, as in FluxPipeline
    again = pipe.encode_prompt(None, prompt_embeds=seq, pooled_prompt_embeds=pooled, device="cpu")
    assert again[0] is seq and again[1] is pooled


def test_pipeline_generates_64px_with_true_cfg(pipe):
    calls = _count_calls(pipe.transformer)
    out = pipe(["a cat on a blue background", "a dog, red background"], negative_prompt=["", ""],
               true_cfg_scale=4.0, num_inference_steps=3, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 64, 64, 3) and np.isfinite(out.images).all()  # 64x64 without height/width
    assert calls[0] == 6  # true CFG: a conditional and an unconditional call per step
    plain = pipe("a cat on a blue background", num_inference_steps=3, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert calls[0] == 9  # no negative prompt: no CFG
    assert not np.allclose(plain[0], out.images[0])
    assert pipe.scheduler.config.shift == 1.0 and not pipe.scheduler.config.use_dynamic_shifting


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")

    def cfg(name: str) -> FluxTrainConfig:
        return FluxTrainConfig(out=str(root / name), cache=str(root / "cache"), scenes=64, steps=4, batch_size=8,
                               checkpoint_every=2, grid_prompts=2, grid_steps=2, transformer=TOY_TRANSFORMER)

    part = train_flux(cfg("resumed"), progress=False, stop_after=2)
    resumed = train_flux(cfg("resumed"), progress=False)
    return root, cfg, part, resumed


def test_toy_training_resumes_from_its_checkpoint(toy_run):
    root, cfg, part, resumed = toy_run
    assert not part["finished"] and part["steps"] == 2 and np.isfinite(part["final_loss"])
    assert torch.load(root / "resumed" / "checkpoint.pt", weights_only=False)["step"] == 4
    assert resumed["finished"] and resumed["steps"] == 4 and np.isfinite(resumed["final_loss"])
    # the text cache is keyed by its length and does not clash with the UNet's 40-token one
    scene_dir = root / "cache" / "scenes-s0-n64"
    assert np.load(scene_dir / "text-48" / "text.npy", mmap_mode="r").shape == (64, 48, 384)
    assert not (scene_dir / "text.npy").exists()
    straight = train_flux(cfg("straight"), progress=False)  # uninterrupted: exactly the same weights
    a = load_file(f"{straight['pipeline']}/transformer/diffusion_pytorch_model.safetensors")
    b = load_file(f"{resumed['pipeline']}/transformer/diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert next(iter(b.values())).dtype == torch.float16
    assert (root / "resumed" / "samples.png").stat().st_size > 0


def test_exported_folder_loads_by_name_and_carries_latent_stats(toy_run, monkeypatch, tmp_path):
    from stepsaver import pipelines
    from stepsaver.pipelines import load_pipeline

    root, _, _, resumed = toy_run
    folder = resumed["pipeline"]
    vae_cfg = json.loads((root / "resumed" / "pipeline" / "vae" / "config.json").read_text())
    assert vae_cfg["shift_factor"] == resumed["shift_factor"] and vae_cfg["scaling_factor"] == resumed["scaling_factor"]
    assert json.loads((root / "resumed" / "pipeline" / "model_index.json").read_text())["_class_name"] == \
        "MiniLMFluxPipeline"
    monkeypatch.setitem(pipelines.EMBEDDED_MODELS, "tiny-flux", root / "resumed" / "pipeline")
    p = load_pipeline("tiny-flux", scheduler=None, device="cpu")
    assert isinstance(p, MiniLMFluxPipeline) and p.tokenizer.model_max_length == 48
    img = p("a cat", negative_prompt="", true_cfg_scale=3.0, num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 64, 64, 3)
    with pytest.raises(StepsaverError, match="embedded models are: tiny, tiny-flux"):
        load_pipeline("tiny-flx")
    monkeypatch.setitem(pipelines.EMBEDDED_MODELS, "tiny-flux", tmp_path / "nowhere")
    with pytest.raises(StepsaverError, match="stepsaver train-flux"):
        load_pipeline("tiny-flux")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "transformer")
    with pytest.raises(StepsaverError, match="'transformer' part .FluxTransformer2DModel. is missing") as e:
        load_pipeline(broken)
    assert "\n" not in str(e.value)


def test_skip_on_tiny_flux_batch_equals_singles_with_true_cfg(pipe):
    """The Skip hook on the Flux layout: true CFG (two transformer calls a step), per-sample paths."""
    from stepsaver import generate_images
    from stepsaver.skip import AdaptiveSkipConfig, disable_adaptive_skip, enable_adaptive_skip

    prompts, seeds = ["a red apple on a blue background", "two cats at the top on green"], [1, 2]
    enable_adaptive_skip(pipe, AdaptiveSkipConfig(threshold=0.5))
    try:
        batch = generate_images(pipe, prompts, steps=12, seeds=seeds, guidance=3.0, output_type="np")
        singles = [generate_images(pipe, [p], steps=12, seeds=[s], guidance=3.0, output_type="np")[0]
                   for p, s in zip(prompts, seeds, strict=True)]
    finally:
        disable_adaptive_skip(pipe)
    for b, s in zip(batch, singles, strict=True):
        assert b.denoiser_calls == s.denoiser_calls < 24  # 2 calls a step (true CFG), some steps skipped
        assert b.extra["denoiser_calls_saved"] == s.extra["denoiser_calls_saved"] > 0
        assert np.abs(np.asarray(b.image) - np.asarray(s.image)).max() < 1e-4


def test_generate_cli_on_tiny_flux_keeps_its_flow_sampler(toy_run, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from stepsaver import pipelines
    from stepsaver.cli import app

    root, _, _, _ = toy_run
    monkeypatch.setitem(pipelines.EMBEDDED_MODELS, "tiny-flux", root / "resumed" / "pipeline")
    runner = CliRunner()
    out = runner.invoke(app, ["generate", "a cat on red", "--model", "tiny-flux", "--steps", "3", "--json",
                              "-o", str(tmp_path / "x.png")])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.stdout)
    assert payload["scheduler"] == "FlowMatchEulerDiscreteScheduler" and payload["denoiser_calls"] == 6  # true CFG
    out = runner.invoke(app, ["generate", "a cat", "--model", "tiny-flux", "--scheduler", "ddim",
                              "-o", str(tmp_path / "y.png")])
    assert out.exit_code == 2 and "flow_euler" in out.output


def test_the_shipped_tiny_flux_loads_offline_and_draws_the_prompt():
    """The folder in the package: fp16 under 20 MB, diffusers' FlowMatchEuler with the model's
    shift, true CFG (two transformer calls a step), and a trained model: the background colour a
    prompt names is the image's dominant colour at 20 steps (the shipped model gets this right for
    nearly every prompt; random weights would not)."""
    from stepsaver import generate_images
    from stepsaver.pipelines import EMBEDDED_MODELS, load_pipeline

    folder = EMBEDDED_MODELS["tiny-flux"]
    size = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    assert size < 20 * 2**20, f"{size / 2**20:.1f} MB"
    pipe = load_pipeline("tiny-flux", device="cpu")
    assert type(pipe).__name__ == "MiniLMFluxPipeline"
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.transformer.dtype == torch.float32  # fp16 on disk, float32 on a CPU
    colours = {"red": (0, 1, 2), "blue": (2, 0, 1), "green": (1, 0, 2)}
    prompts = [f"a cat on a {c} background" for c in colours]
    results = generate_images(pipe, prompts, steps=20, seeds=[0, 1, 2], guidance=4.0, output_type="np")
    for r, (c, (hi, *lo)) in zip(results, colours.items(), strict=True):
        image = np.asarray(r.image, dtype=np.float64)
        assert r.denoiser_calls == 40 and np.isfinite(image).all()
        corners = np.concatenate([image[:6, :6].reshape(-1, 3), image[-6:, -6:].reshape(-1, 3)]).mean(0)
        assert corners[hi] > corners[lo].max() + 0.15, (c, corners)
