"""Decoder fine-tuning keeps the latent space (encoder, scaling factor) and ships a usable pipeline."""

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from stepsaver import generate, load_pipeline
from stepsaver.errors import StepsaverError
from stepsaver.shrink.autoencoder import AutoencoderTrainConfig, train_autoencoder
from stepsaver.shrink.decoder import DecoderTuneConfig, tune_decoder
from tests.helpers import REPO

TINY = REPO / "src" / "stepsaver" / "models" / "tiny"


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    train_autoencoder(AutoencoderTrainConfig(out=str(out), steps=2, batch_size=4, eval_images=8))
    return out / "vae"


def _cfg(tmp_path, vae_dir, **kw):
    base = dict(vae=str(vae_dir), out=str(tmp_path / "dec"), steps=3, batch_size=4, eval_images=8,
                checkpoint_every=1)
    base.update(kw)
    return DecoderTuneConfig(**base)


def test_only_the_decoder_learns_and_the_pipeline_loads(tmp_path, vae_dir):
    result = tune_decoder(_cfg(tmp_path, vae_dir, into_pipeline=str(TINY)))
    old = AutoencoderKL.from_pretrained(vae_dir)
    new = AutoencoderKL.from_pretrained(result["vae"])
    assert new.config.scaling_factor == old.config.scaling_factor
    for (name, a), b in zip(old.state_dict().items(), new.state_dict().values(), strict=True):
        if name.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(a, b), f"{name} moved: the UNet's latent space would change"
    changed = [n for n, a in old.state_dict().items() if n.startswith("decoder.")
               and not torch.equal(a, new.state_dict()[n])]
    assert changed, "the decoder did not learn"
    assert Path(result["figure"]).stat().st_size > 0
    for when in ("before", "after"):
        assert result[when]["psnr_db"] > 0 and result[when]["lpips_alex"] >= 0
    pipe = load_pipeline(result["pipeline"], device="cpu")
    shipped = load_file(str(Path(result["pipeline"]) / "vae" / "diffusion_pytorch_model.safetensors"))
    assert next(iter(shipped.values())).dtype == torch.float16
    assert generate(pipe, "a cat on a blue background", steps=2).denoiser_calls == 2


def test_resume_continues_from_the_checkpoint(tmp_path, vae_dir):
    first = tune_decoder(_cfg(tmp_path, vae_dir, steps=2))
    second = tune_decoder(_cfg(tmp_path, vae_dir, steps=3))
    assert second["before"] == first["before"]  # measured once, on the untouched decoder
    assert torch.load(tmp_path / "dec" / "checkpoint.pt", weights_only=False)["step"] == 3


def test_bad_inputs_are_one_line_errors(tmp_path, vae_dir):
    with pytest.raises(StepsaverError, match="no AutoencoderKL folder"):
        tune_decoder(_cfg(tmp_path, vae_dir, vae=str(tmp_path / "missing")))
    with pytest.raises(StepsaverError, match="not a pipeline folder"):
        tune_decoder(_cfg(tmp_path, vae_dir, into_pipeline=str(tmp_path)))
