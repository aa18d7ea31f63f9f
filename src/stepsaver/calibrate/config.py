"""The calibrated config file: what ``calibrate`` chose, and the one place production reads it from.

``generate --config``, :func:`load_calibrated` / :meth:`CalibratedConfig.apply` in Python and
``serve --config`` all load the same JSON file, so the setting that passed validation is the
setting that runs. The file records the model's fingerprint (a hash of the denoiser's weights,
independent of the dtype it was loaded in) and is refused on any other model: a threshold found
for one model says nothing about another, which is the whole reason calibration exists.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepsaver.calibrate.space import OWN, Candidate, skip_config
from stepsaver.errors import StepsaverError
from stepsaver.files import read_json, write_atomically

__all__ = ["FORMAT", "CalibratedConfig", "is_calibrated_config", "load_calibrated", "pipeline_fingerprint",
           "quick_weights_digest"]

FORMAT = "stepsaver-calibration/1"
_SAMPLE = 1 << 22  # at most this many values per model enter the fingerprint (4 M: instant even for SDXL)


def pipeline_fingerprint(pipe: Any) -> str:
    """A hash of the denoiser's class, config and weights (as float16, so fp32 and fp16 loads agree).

    Every tensor's name and shape enter it; its values do too, all of them for models up to
    4 M parameters and an even stride through each tensor above that, so a fine-tune, a fused
    LoRA or another checkpoint of the same architecture gets another fingerprint.
    """
    import torch

    from stepsaver.calls import denoiser_of

    denoiser = denoiser_of(pipe)
    if not isinstance(denoiser, torch.nn.Module):
        raise StepsaverError(f"{type(pipe).__name__} has no unet or transformer to fingerprint")
    state = denoiser.state_dict()
    total = sum(t.numel() for t in state.values())
    stride = max(1, total // _SAMPLE)
    digest = hashlib.sha256(type(denoiser).__name__.encode())
    config = getattr(denoiser, "config", {})
    digest.update(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, sort_keys=True,
                             default=str).encode())
    for name, tensor in sorted(state.items()):
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        values = tensor.detach().flatten()[::stride]
        digest.update(values.to("cpu", torch.float16).numpy().tobytes())
    return digest.hexdigest()[:20]


def quick_weights_digest(*modules: Any) -> str:
    """A SHA-1 (hex) of the modules' parameter names and the first 16 values of each tensor.

    Why beside :func:`pipeline_fingerprint`: render caches on disk (``bench skip``, ``bench
    caches``) need a key for the parts the denoiser's fingerprint leaves out (the VAE decoder)
    and must stay readable by the runs that wrote them; this cheaper digest is the one their
    folder names were made with. Modules that are not ``torch.nn.Module`` (``None``) are skipped.
    """
    import torch

    digest = hashlib.sha1()
    for module in modules:
        if isinstance(module, torch.nn.Module):
            for name, param in module.state_dict().items():
                digest.update(name.encode())
                digest.update(param.detach().flatten()[:16].float().cpu().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class CalibratedConfig:
    """The chosen configuration with what it was chosen for and how it did on held-out prompts."""

    model: str
    fingerprint: str
    candidate: Candidate
    tolerance: str
    reference: dict[str, Any]
    guidance: float = 5.0
    recommender: str | None = None
    scheduler_class: str = ""
    calibration: dict[str, Any] = field(default_factory=dict)
    heldout: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    stepsaver: str = ""

    def to_dict(self) -> dict[str, Any]:
        from stepsaver import __version__

        return {"format": FORMAT, "model": self.model, "fingerprint": self.fingerprint,
                "setting": self.candidate.to_dict(), "label": self.candidate.label,
                "recommender": self.recommender, "guidance": self.guidance, "scheduler_class": self.scheduler_class,
                "tolerance": self.tolerance, "reference": self.reference, "calibration": self.calibration,
                "heldout": self.heldout, "created": self.created, "stepsaver": self.stepsaver or __version__}

    def save(self, path: str | Path) -> Path:
        from stepsaver.jsonsafe import dumps

        text = dumps(self.to_dict(), indent=2) + "\n"
        Path(path).parent.mkdir(parents=True, exist_ok=True)  # `--out new/folder/cal.json` is not an error
        return write_atomically(path, lambda tmp: tmp.write_text(text))

    @classmethod
    def from_dict(cls, data: Any, where: str = "config") -> CalibratedConfig:
        if not is_calibrated_config(data):
            raise StepsaverError(f"{where} is not a stepsaver calibration (no \"format\": \"{FORMAT}\"); "
                                 "make one with `stepsaver calibrate`")
        try:
            candidate = Candidate.from_dict(data["setting"])
            guidance = float(data.get("guidance", 5.0))
            return cls(model=str(data["model"]), fingerprint=str(data["fingerprint"]), candidate=candidate,
                       tolerance=str(data["tolerance"]), reference=dict(data.get("reference") or {}),
                       guidance=guidance, recommender=data.get("recommender"),
                       scheduler_class=str(data.get("scheduler_class", "")),
                       calibration=dict(data.get("calibration") or {}), heldout=dict(data.get("heldout") or {}),
                       created=str(data.get("created", "")), stepsaver=str(data.get("stepsaver", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise StepsaverError(f"{where} is a damaged calibration (missing or bad {exc}); recalibrate") from None

    # ---- using it ---------------------------------------------------------------------------
    def check(self, pipe: Any) -> None:
        """Refuse a pipeline whose denoiser is not the one this config was calibrated on."""
        found = pipeline_fingerprint(pipe)
        if found != self.fingerprint:
            raise StepsaverError(f"this calibration is for model {self.model!r} (fingerprint {self.fingerprint}); "
                                 f"the loaded model's fingerprint is {found}: calibrate this model with "
                                 "`stepsaver calibrate --model ...` instead of reusing another model's setting")

    def apply(self, pipe: Any) -> Any:
        """Put the calibrated scheduler, Skip and cache on ``pipe`` (after :meth:`check`); returns ``pipe``.

        Generate with :meth:`steps` as the ``steps`` argument and :attr:`guidance`.
        """
        from stepsaver.pipelines import make_scheduler

        self.check(pipe)
        c = self.candidate
        if c.scheduler != OWN:
            pipe.scheduler = make_scheduler(c.scheduler, pipe.scheduler.config)
        if c.skip is not None:
            from stepsaver.skip import enable_adaptive_skip

            enable_adaptive_skip(pipe, skip_config(c.skip))
        self.attach_cache(pipe)
        return pipe

    def attach_cache(self, pipe: Any) -> None:
        """Attach the calibrated diffusers cache to ``pipe``'s denoiser and leave it on (nothing when there
        is none): ``enable_cache`` on a CacheMixin transformer, diffusers' PAB hooks on a UNet."""
        c = self.candidate
        if c.cache is not None:
            c.cache.attach(pipe, c.steps or 0)

    def steps(self) -> Any:
        """The ``steps`` argument of :func:`stepsaver.generate`: a count, or the recommender's chooser."""
        if self.candidate.confidence is None:
            return self.candidate.steps
        from stepsaver.predict import step_chooser

        return step_chooser(self.recommender or "tiny", self.candidate.confidence)


def is_calibrated_config(data: Any) -> bool:
    return isinstance(data, dict) and data.get("format") == FORMAT


def load_calibrated(path: str | Path) -> CalibratedConfig:
    """Read a config file written by ``calibrate`` (one-line errors for a missing or foreign file)."""
    data = read_json(path, "calibration", "; make one with `stepsaver calibrate`")
    return CalibratedConfig.from_dict(data, where=f"calibration file {Path(path)}")
