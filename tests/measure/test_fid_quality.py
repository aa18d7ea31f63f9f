"""FID/KID on the real TF-FID Inception, PSNR and SSIM: behaviours that can fail."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from stepsaver.errors import StepsaverError
from stepsaver.measure import fid as fidmod
from stepsaver.measure.quality import psnr, ssim
from stepsaver.scenes import SceneGenerator


@pytest.fixture(scope="module")
def scenes():
    gen = SceneGenerator(seed=5, split="eval")
    return np.stack([gen[i][0] for i in range(24)])


def _blur(images, radius):
    return np.stack([np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(radius))) for x in images])


def test_fid_is_zero_against_itself_large_against_shift_and_monotone_in_blur(scenes, tmp_path, monkeypatch):
    monkeypatch.setenv("STEPSAVER_CACHE", str(tmp_path))
    real = fidmod.features(scenes, cache=True)
    assert real.shape == (24, 2048)
    assert list((tmp_path / "fid").glob("*.pt"))  # cached by content
    torch.testing.assert_close(fidmod.features(scenes, cache=True), real)
    assert abs(fidmod.fid_from_features(real, real)) < 1e-2
    shifted = np.clip(scenes.astype(int) + 60, 0, 255).astype(np.uint8)
    assert fidmod.fid_from_features(real, fidmod.features(shifted)) > 20
    fids = [fidmod.fid_from_features(real, fidmod.features(_blur(scenes, r))) for r in (0.5, 1.0, 2.0)]
    assert fids[0] < fids[1] < fids[2], fids
    kid_small, _ = fidmod.kid_from_features(real, fidmod.features(_blur(scenes, 0.5)))
    kid_big, _ = fidmod.kid_from_features(real, fidmod.features(_blur(scenes, 2.0)))
    assert kid_big > kid_small


def test_fid_input_errors(scenes):
    with pytest.raises(StepsaverError, match="at least 2"):
        fidmod.fid_kid(scenes[:1], scenes[:1])
    with pytest.raises(StepsaverError, match="uint8"):
        fidmod.extractor()(torch.rand(1, 3, 64, 64))


def test_psnr_and_ssim_order_distortions(scenes):
    x = scenes[:8]
    assert torch.isinf(psnr(x, x)).all() or (psnr(x, x) > 90).all()
    torch.testing.assert_close(ssim(x, x), torch.ones(8), atol=2e-3, rtol=0)  # float32 variance cancellation
    mild, strong = _blur(x, 0.7), _blur(x, 2.0)
    assert (psnr(x, mild) > psnr(x, strong)).all()
    assert (ssim(x, mild) > ssim(x, strong)).all()
    noise = np.clip(x.astype(float) + np.random.default_rng(0).normal(0, 20, x.shape), 0, 255).astype(np.uint8)
    assert float(psnr(x, noise).mean()) == pytest.approx(22.4, abs=1.5)  # 20/255 noise -> ~22 dB
    with pytest.raises(StepsaverError, match="differ in shape"):
        psnr(x, x[:, :32])
