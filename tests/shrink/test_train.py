"""A short end-to-end train-then-sample run on a few hundred scenes, and exact resumption."""

import json

import pytest
import torch
from safetensors.torch import load_file

from stepsaver import generate, load_pipeline
from stepsaver.errors import StepsaverError
from stepsaver.shrink.autoencoder import AutoencoderTrainConfig, train_autoencoder
from stepsaver.shrink.train import TrainConfig, train_model


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    metrics = train_autoencoder(AutoencoderTrainConfig(out=str(out), steps=4, batch_size=8, eval_images=16,
                                                       checkpoint_every=2))
    assert metrics["psnr_db"] > 0 and metrics["scaling_factor"] > 0
    return out / "vae"


def _cfg(tmp_path, vae_dir, name, **kw):
    base = dict(out=str(tmp_path / name), vae=str(vae_dir), scenes=200, steps=6, batch_size=8,
                cache=str(tmp_path / "cache"), checkpoint_every=2, ema_fraction=0.5, grid_prompts=2,
                grid_steps=2)
    base.update(kw)
    return TrainConfig(**base)


def test_train_then_sample_end_to_end(tmp_path, vae_dir):
    summary = train_model(_cfg(tmp_path, vae_dir, "run"), progress=False)
    assert summary["finished"] and summary["steps"] == 6
    assert summary["ema_from_step"] == 3  # EMA only over the last half here (configured)
    pipe = load_pipeline(summary["pipeline"], device="cpu")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    result = generate(pipe, "a cat on a blue background", steps=3)
    assert result.denoiser_calls == 3
    assert (tmp_path / "run" / "samples.png").stat().st_size > 0
    weights = load_file(str(tmp_path / "run" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert next(iter(weights.values())).dtype == torch.float16
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["recipe"] == "deci"


def test_sd_recipe_trains_the_baseline(tmp_path, vae_dir):
    summary = train_model(_cfg(tmp_path, vae_dir, "sd", recipe="sd", steps=2), progress=False)
    assert summary["ema_from_step"] == 0  # SD keeps an EMA throughout
    pipe = load_pipeline(summary["pipeline"], scheduler=None, device="cpu")
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.scheduler.config.timestep_spacing == "leading"


def test_killed_run_resumes_to_the_same_weights(tmp_path, vae_dir):
    straight = train_model(_cfg(tmp_path, vae_dir, "straight"), progress=False)
    part = train_model(_cfg(tmp_path, vae_dir, "resumed"), progress=False, stop_after=3)
    assert not part["finished"] and part["steps"] == 3
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["step"] == 3
    resumed = train_model(_cfg(tmp_path, vae_dir, "resumed"), progress=False)
    assert resumed["steps"] == 6
    a = load_file(f"{straight['pipeline']}/unet/diffusion_pytorch_model.safetensors")
    b = load_file(f"{resumed['pipeline']}/unet/diffusion_pytorch_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_fine_tune_starts_from_the_given_pipeline(tmp_path, vae_dir):
    base = train_model(_cfg(tmp_path, vae_dir, "base", steps=2), progress=False)
    # seed 1 draws other batches and noise, scene_seed 0 reuses the cached scene set of the base run
    cfg = _cfg(tmp_path, vae_dir, "tuned", steps=2, seed=1, scene_seed=0, init_from=base["pipeline"])
    start = train_model(cfg, progress=False, stop_after=0)
    assert not start["finished"]
    init = load_file(f"{base['pipeline']}/unet/diffusion_pytorch_model.safetensors")
    state = torch.load(tmp_path / "tuned" / "checkpoint.pt", weights_only=False)["model"]
    for k, v in init.items():
        torch.testing.assert_close(state[k], v.float())
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["scenes-s0-n200"]
    tuned = train_model(cfg, progress=False)
    assert tuned["finished"]
    after = load_file(f"{tuned['pipeline']}/unet/diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(after[k], init[k]) for k in init)
    with pytest.raises(StepsaverError, match="trained for v_prediction"):
        train_model(_cfg(tmp_path, vae_dir, "x", recipe="sd", init_from=base["pipeline"]), progress=False)
    with pytest.raises(StepsaverError, match="no UNet config.json"):
        train_model(_cfg(tmp_path, vae_dir, "x", init_from=str(tmp_path / "nowhere")), progress=False)


def test_bad_training_config_is_a_clear_error(tmp_path, vae_dir):
    with pytest.raises(StepsaverError, match="unknown recipe"):
        train_model(_cfg(tmp_path, vae_dir, "x", recipe="sdxl"), progress=False)
    with pytest.raises(StepsaverError, match="no trained autoencoder"):
        train_model(_cfg(tmp_path, tmp_path / "novae", "x"), progress=False)


def test_bench_recipe_trains_both_at_identical_compute_and_reports(tmp_path, vae_dir):
    from stepsaver.bench.recipe import bench_recipe, steps_to_match

    assert steps_to_match({10: 9.0, 20: 5.0, 30: 4.0}, 5.0) == 20
    assert steps_to_match({10: 9.0, 20: 6.0}, 5.0) is None
    base = _cfg(tmp_path, vae_dir, "unused", steps=2)
    result = bench_recipe(base, work=tmp_path / "recipe", n=4, grid=(2, 3), batch=4, out_dir=tmp_path / "res",
                          progress=False, n_boot=2)
    assert [(r["recipe"], r["steps"]) for r in result["rows"]] == [("deci", 2), ("deci", 3), ("sd", 2), ("sd", 3)]
    assert all(r["fid"] >= 0 and 0 <= r["adherence"] <= 1 for r in result["rows"])
    report = json.loads((tmp_path / "res" / "recipe.json").read_text())
    for recipe in ("deci", "sd"):  # identical compute: same steps and batch, only the recipe differs
        cfg = json.loads((tmp_path / "recipe" / recipe / "train_config.json").read_text())
        assert cfg["steps"] == 2 and cfg["batch_size"] == base.batch_size and cfg["recipe"] == recipe
    assert "Target" in (tmp_path / "res" / "recipe.md").read_text() and "target_met" in report
