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
    blurred = {r: fidmod.features(_blur(scenes, r)) for r in (0.5, 1.0, 2.0)}
    fids = [fidmod.fid_from_features(real, f) for f in blurred.values()]
    assert fids[0] < fids[1] < fids[2], fids
    kid_small, _ = fidmod.kid_from_features(real, blurred[0.5])
    kid_big, _ = fidmod.kid_from_features(real, blurred[2.0])
    assert kid_big > kid_small


def test_fid_input_errors(scenes):
    with pytest.raises(StepsaverError, match="at least 2"):
        fidmod.fid_kid(scenes[:1], scenes[:1])
    with pytest.raises(StepsaverError, match="KID needs at least 4"):
        fidmod.kid_from_features(torch.rand(3, 2048), torch.rand(3, 2048))
    with pytest.raises(StepsaverError, match="uint8"):
        fidmod.extractor()(torch.rand(1, 3, 64, 64))


def test_psnr_and_ssim_order_distortions(scenes):
    x = scenes[:8]
    assert torch.isinf(psnr(x, x)).all() or (psnr(x, x) > 90).all()
    torch.testing.assert_close(ssim(x, x), torch.ones(8, dtype=torch.float64), atol=1e-9, rtol=0)  # float64
    mild, strong = _blur(x, 0.7), _blur(x, 2.0)
    assert (psnr(x, mild) > psnr(x, strong)).all()
    assert (ssim(x, mild) > ssim(x, strong)).all()
    noise = np.clip(x.astype(float) + np.random.default_rng(0).normal(0, 20, x.shape), 0, 255).astype(np.uint8)
    assert float(psnr(x, noise).mean()) == pytest.approx(22.4, abs=1.5)  # 20/255 noise -> ~22 dB
    with pytest.raises(StepsaverError, match="differ in shape"):
        psnr(x, x[:, :32])


def test_fid_resize_is_tf1_legacy_bilinear_not_half_pixel():
    x = torch.tensor([[[[0.0, 10.0]]]]).expand(1, 1, 2, 2).clone()  # columns 0 and 10
    out = fidmod.tf_resize_bilinear(x, 4)
    # TF1 resize_bilinear(align_corners=False): source = dst * in/out = 0, 0.5, 1, 1.5 (clamped)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 10.0]))
    half_pixel = torch.nn.functional.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(half_pixel[0, 0, 0], torch.tensor([0.0, 2.5, 7.5, 10.0]))  # what it used to do
    big = torch.rand(2, 3, 64, 64)
    assert fidmod.tf_resize_bilinear(big, 299).shape == (2, 3, 299, 299)
    torch.testing.assert_close(fidmod.tf_resize_bilinear(big, 64), big)  # identity at the same size


def test_feature_cache_is_keyed_by_network_and_resize(scenes, tmp_path, monkeypatch):
    monkeypatch.setenv("STEPSAVER_CACHE", str(tmp_path))
    fidmod.features(scenes[:4], cache=True)
    monkeypatch.setattr(fidmod, "RESIZE", "another-resize")
    fidmod.features(scenes[:4], cache=True)
    monkeypatch.setattr(fidmod, "_NETWORK_DIGEST", "another-network")
    fidmod.features(scenes[:4], cache=True)
    assert len(list((tmp_path / "fid").glob("*.pt"))) == 3  # no stale reuse across either


def test_kid_std_is_a_real_spread_at_small_n():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(60, 2048, generator=g), torch.randn(60, 2048, generator=g) + 0.3
    _, std = fidmod.kid_from_features(real, fake)
    assert std > 1e-4  # subsets of the whole set gave ~1e-9 (rounding noise)


def test_ssim_is_float64_where_labels_decide():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=g, dtype=torch.float64)
    y = (x + 1e-3 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    from torchmetrics.functional.image import structural_similarity_index_measure

    x32, y32 = x.float(), y.float()
    reference = structural_similarity_index_measure(x32.double(), y32.double(), data_range=1.0, reduction="none")
    float32 = structural_similarity_index_measure(x32, y32, data_range=1.0, reduction="none").double()
    ours = ssim(x32, y32)
    assert ours.dtype == torch.float64 and (ours - reference).abs().max() < 1e-12
    assert (float32 - reference).abs().max() > 1e-8  # what float32 arithmetic used to cost



def test_onnx_runtime_features_equal_torchscript_and_the_runtime_keys_the_cache(scenes, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("STEPSAVER_CACHE", str(tmp_path))
    ort_net = fidmod.InceptionFeatures()
    assert ort_net.backend == "onnxruntime"
    monkeypatch.setenv("STEPSAVER_FID_BACKEND", "torch")
    torch_net = fidmod.InceptionFeatures()
    assert torch_net.backend == "torch"
    x = fidmod.to_uint8_nchw(scenes[:3])
    a, b = ort_net(x), torch_net(x)
    assert a.shape == (3, 2048) and float((a - b).abs().max()) < 1e-4  # the same graph, another runtime
    assert len(list(tmp_path.glob("fid/inception-*.onnx"))) == 1  # exported once, kept
    monkeypatch.setenv("STEPSAVER_FID_BACKEND", "tensorflow")
    with pytest.raises(StepsaverError, match="STEPSAVER_FID_BACKEND must be one of"):
        fidmod.backend_name()
