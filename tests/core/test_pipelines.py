"""load_pipeline and the scheduler registry on the embedded model and tiny random SD/SDXL folders."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from stepsaver import SCHEDULERS, StepsaverError, generate, load_pipeline, make_scheduler
from stepsaver.pipelines import schedulers_for
from stepsaver.text import encode_captions


def test_registry_maps_names_to_diffusers_classes(embedded_pipe):
    for name, spec in SCHEDULERS.items():
        if spec.flow:
            continue
        sched = make_scheduler(name, embedded_pipe.scheduler.config)
        assert type(sched).__name__ == spec.cls_name
        # the model's own training choices survive the swap
        assert sched.config.prediction_type == "v_prediction"
        assert sched.config.beta_schedule == "squaredcos_cap_v2"
    assert make_scheduler("dpm2_karras", embedded_pipe.scheduler.config).config.use_karras_sigmas
    with pytest.raises(StepsaverError, match="ddim, euler"):
        make_scheduler("nonsense", embedded_pipe.scheduler.config)


def test_flow_matching_and_noise_schedule_samplers_do_not_mix(embedded_pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler

    flow = dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert schedulers_for(flow) == ["flow_euler"] and "flow_euler" not in schedulers_for(embedded_pipe.scheduler.config)
    assert make_scheduler("flow_euler", flow).config.shift == 3.0  # the model's shift carries over
    with pytest.raises(StepsaverError, match="does not fit a flow-matching model.*flow_euler"):
        make_scheduler("ddim", flow)
    with pytest.raises(StepsaverError, match="does not fit a noise-schedule.*ddim, euler"):
        make_scheduler("flow_euler", embedded_pipe.scheduler.config)


def test_embedded_model_is_a_standard_sd_pipeline(embedded_pipe):
    assert isinstance(embedded_pipe, StableDiffusionPipeline)
    assert embedded_pipe.unet.config.cross_attention_dim == 384
    assert embedded_pipe.vae.config.latent_channels == 4
    assert embedded_pipe.scheduler.config.timestep_spacing == "trailing"
    assert embedded_pipe.scheduler.config.rescale_betas_zero_snr


def test_embedded_model_ships_small_and_fp16():
    from stepsaver.pipelines import EMBEDDED_DIR

    files = [p for p in EMBEDDED_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 1024 * 1024
    from safetensors import safe_open

    with safe_open(str(EMBEDDED_DIR / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        key = next(iter(f.keys()))
        assert f.get_tensor(key).dtype == torch.float16


def test_precomputed_embeddings_equal_the_pipelines_encode_prompt(embedded_pipe):
    prompts = ["a cat on the left and a rocket on the right, yellow background", ""]
    ours = encode_captions(prompts, embedded_pipe.text_encoder, embedded_pipe.tokenizer)
    theirs, _ = embedded_pipe.encode_prompt(prompts, "cpu", 1, False)
    assert ours.shape == (2, 40, 384)
    torch.testing.assert_close(ours, theirs)


def test_embedded_generation_is_deterministic_and_counts_calls(embedded_pipe):
    a = generate(embedded_pipe, "a large apple on a blue background", steps=4, seed=1)
    b = generate(embedded_pipe, "a large apple on a blue background", steps=4, seed=1)
    assert a.denoiser_calls == 4
    assert list(a.images[0].getdata()) == list(b.images[0].getdata())
    assert a.images[0].size == (64, 64)


@pytest.mark.parametrize("layout,cls", [("sd15", StableDiffusionPipeline), ("sdxl", StableDiffusionXLPipeline)])
def test_local_sd_and_sdxl_folders_load_with_diffusers_loaders(tiny_folders, layout, cls):
    pipe = load_pipeline(tiny_folders[layout], scheduler="euler_a", device="cpu")
    assert isinstance(pipe, cls)
    r = generate(pipe, "a red cat", steps=3, seed=0, height=32, width=32)
    assert r.denoiser_calls == 3 and r.images[0].size == (32, 32)


def test_bad_model_names_and_folders_give_one_line_errors(tmp_path, tiny_folders):
    with pytest.raises(StepsaverError, match="does not exist") as e:
        load_pipeline(tmp_path / "missing")
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StepsaverError, match="no model_index.json"):
        load_pipeline(tmp_path / "empty")
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "model_index.json").write_text("{not json")
    with pytest.raises(StepsaverError, match="corrupt"):
        load_pipeline(bad)
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_folders["sd15"], broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(StepsaverError, match="cannot load model") as e:
        load_pipeline(broken)
    assert "\n" not in str(e.value)
    with pytest.raises(StepsaverError, match="cannot load model 'nobody/no-such-model'"):
        load_pipeline("nobody/no-such-model")  # HF_HUB_OFFLINE=1: resolved offline, fails clearly
    with pytest.raises(StepsaverError, match="unknown dtype"):
        load_pipeline("tiny", dtype="float8")
    index = json.loads((tiny_folders["sd15"] / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"


def test_every_sampler_agrees_with_ddim_on_the_zero_snr_embedded_model(embedded_pipe):
    """Samplers without zero-terminal-SNR support get clamped betas instead of NaN or garbage.

    At 50 steps every sampler has converged to DDIM's image (observed <= 0.03; unclamped Heun is
    ~0.5 off, DPM2 NaN). At 20 steps PNDM and LMS legitimately differ more, so that is not tested.
    """
    import numpy as np

    original = embedded_pipe.scheduler
    prompt = "a big apple in the center on a blue background"
    try:
        images = {}
        for name in schedulers_for(original.config):
            embedded_pipe.scheduler = make_scheduler(name, original.config)
            images[name] = embedded_pipe(prompt, num_inference_steps=50, guidance_scale=5.0, output_type="np",
                                         generator=torch.Generator().manual_seed(0)).images[0]
    finally:
        embedded_pipe.scheduler = original
    for name, img in images.items():
        assert np.isfinite(img).all(), name
        assert np.abs(img - images["ddim"]).mean() < 0.04, name
