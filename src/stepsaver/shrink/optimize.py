"""``stepsaver optimize``: a faster denoiser per iteration on *this* machine, kept only where it pays.

DeciDiffusion's Infery (selective quantisation, hybrid compilation, kernels) is the part of its
speed-up that is not the architecture. This module is the stand-in that exists on a CPU: it tries
each lever people serving on CPUs pick today on the pipeline's denoiser (and, where it applies,
the VAE decoder), measures it here, and keeps it only when it is both

* **faster**: the median per-iteration latency of the denoiser at every batch size the user
  serves (``batch_sizes``, default batch 1: one prompt; the CFG pair is one call), timed in the
  same run and interleaved with eager fp32 so that a busy machine slows both alike, beats eager by
  ``min_speedup`` (default 1.05: a lever within timing noise of eager is not worth its build time)
  at the *worst* of those batch sizes (a lever can win at batch 1 and lose at batch 8: ONNX
  Runtime on the embedded UNet was 1.93x at batch 1 and 1.17x at batch 8), and
* **lossless in practice**: every calibration prompt's final image is within PSNR >= 35 dB and
  LPIPS <= 0.01 of the eager fp32 image of the same prompt and seed (images made through
  :func:`stepsaver.generation.generate_images`, the one code path that calls pipelines).

The levers (:data:`LEVERS`):

``channels_last``
    NHWC weights and activations for the convolutions (denoiser and decoder).
``compile``
    ``module.compile()`` with Inductor, in place, so the Skip hook composes in any order. Each
    new input shape compiles again (minutes on a 2-core CPU); optimize times and renders at one
    shape so it compiles once.
``bf16``
    bfloat16 weights behind a cast (the module still takes and returns float32, so the
    pipeline is unchanged). Only CPUs with AVX512-BF16 or AMX run it natively; elsewhere it is
    emulated and slower, which the measurement shows.
``int8``
    dynamic int8 (``torch.ao`` dynamic quantisation: int8 weights, activations quantised per
    call) of every ``Linear`` and ``Conv2d`` of the denoiser.
``int8_selective``
    the same, but only for the layers where int8 costs little: each layer's sensitivity (the
    relative L2 error of the denoiser output on calls captured from a real run when that layer
    alone is int8) is measured, and the least sensitive layers are quantised, as many as keep the
    whole denoiser's output error within ``SELECTIVE_BUDGET``; the rest stay float.
``onnxruntime`` / ``openvino``
    the denoiser (and decoder) traced and run by ONNX Runtime or OpenVINO (fp32; OpenVINO's
    precision hint pinned so a bf16-capable CPU does not silently switch), behind a module that
    takes the same arguments and returns the same output type as the original, so the diffusers
    pipeline, the call counter and the Skip hook see an ordinary ``nn.Module``.
``optimum_intel``
    reported, never run: optimum-intel cannot be installed next to the CPU torch (see
    :data:`OPTIMUM_INTEL_NOTE`); the ``openvino`` lever runs the same runtime without it.

Levers of one group do not stack (``int8``/``int8_selective``/``bf16`` are three precisions; an
exported runtime replaces the torch module, so it stacks with nothing); the kept torch levers are
then tried together (layout, the fastest kept precision, compile; under compile, a precision that
kept quality but was too slow alone, see :func:`_stack`) and the combination is kept under the
same rule. The chosen setting is the kept candidate with the largest speedup. A lever
that fails to build or run is reported with its error and skipped; it never stops the run.

**What a saved folder is** (:func:`save_optimized`, :func:`load_optimized`): ``optimize.json``
(every measurement, the machine, the chosen levers and their parameters, e.g. the float layers
of ``int8_selective``) plus a reference to the base model (an embedded model's name and weight
fingerprint, a local folder's path and fingerprint, or the pipeline itself saved under
``base/``). Nothing compiled or exported is stored: :func:`load_optimized` loads the base model
and *re-applies* the levers, so the first call after loading pays the export or compilation
again (seconds for ONNX/OpenVINO, minutes for Inductor). Because a lever's verdict holds only for
the machine it was measured on, a folder made under another torch version or on a CPU with other
instruction-set flags is refused with the reason.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from stepsaver.errors import StepsaverError

__all__ = ["FORMAT", "LEVERS", "CastModule", "ExportedModule", "Lever", "OptimizeResult", "PairedTimer", "Timer",
           "apply_levers", "check_machine", "default_prompts", "load_model", "load_optimized", "machine_info",
           "optimize_pipeline", "parse_levers", "read_optimized", "save_optimized", "summary_rows"]

FORMAT = "stepsaver-optimized/1"
PSNR_MIN = 35.0
LPIPS_MAX = 0.01
MIN_SPEEDUP = 1.05
SELECTIVE_BUDGET = 0.005
"""Largest relative L2 error of the denoiser output ``int8_selective`` accepts from the layers it
quantises; full ``int8`` of the embedded model's UNet is ~0.8 (its last convolutions carry the image)."""
COMPILE_BACKEND = "inductor"
"""The backend of the ``compile`` lever; tests swap in a cheap one (Inductor's codegen takes minutes here)."""
PSNR_CAP = 100.0  # identical images have infinite PSNR; JSON and means need a number

FLAGS_THAT_MATTER = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                     "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
"""CPU flags that change which kernels torch, ONNX Runtime and OpenVINO run (and so a lever's verdict)."""

OPTIMUM_INTEL_NOTE = (
    "cannot install: optimum-intel 2.2.0 requires torchvision and resolves torch>=2.1 to torch 2.14.1 with "
    "19 nvidia-* CUDA packages (replacing the pinned CPU torch 2.13.0) and downgrades transformers to <5.6; "
    "the `openvino` lever runs the same OpenVINO runtime on the denoiser without it")


# ---- the machine -------------------------------------------------------------------------------
def _cpuinfo() -> tuple[str, list[str]]:
    """(model name, flags) from /proc/cpuinfo; the platform's processor string elsewhere."""
    name, flags = "", []
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not name:
                name = value.strip()
            elif key == "flags" and not flags:
                flags = value.split()
            if name and flags:
                break
    return name or platform.processor() or platform.machine(), flags


def machine_info() -> dict[str, Any]:
    """What a lever's verdict depends on: torch, the CPU's model and instruction-set flags, threads."""
    name, flags = _cpuinfo()
    info: dict[str, Any] = {"torch": torch.__version__, "cpu": name,
                            "cpu_flags": [f for f in FLAGS_THAT_MATTER if f in flags],
                            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                            "threads": torch.get_num_threads(), "python": platform.python_version()}
    for module in ("onnxruntime", "openvino"):
        with contextlib.suppress(Exception):
            info[module] = __import__(module).__version__
    return info


def check_machine(recorded: dict[str, Any], where: str = "this optimised folder") -> None:
    """Refuse levers measured under another torch or on a CPU with other flags (one-line error)."""
    here = machine_info()
    problems = []
    if recorded.get("torch") != here["torch"]:
        problems.append(f"torch {recorded.get('torch')} (this machine has {here['torch']})")
    if recorded.get("cpu") != here["cpu"]:
        problems.append(f"CPU {recorded.get('cpu')!r} (this machine has {here['cpu']!r})")
    if sorted(recorded.get("cpu_flags") or []) != sorted(here["cpu_flags"]):
        problems.append(f"CPU flags {' '.join(recorded.get('cpu_flags') or []) or 'none'} "
                        f"(this machine has {' '.join(here['cpu_flags']) or 'none'})")
    if problems:
        raise StepsaverError(f"{where} was made for {'; '.join(problems)}: its speedups do not carry over; "
                             "re-run `stepsaver optimize` on this machine")


# ---- modules that stand in for the denoiser ------------------------------------------------------
class _Wrapper(nn.Module):
    """An ``nn.Module`` around ``inner`` that answers every other public attribute (``config``,
    ``device``, ``add_embedding``...) from it, so a pipeline reads the wrapper as it read the original.

    Private names (``_diffusers_hook``, accelerate's ``_hf_hook``...) are the wrapper's own and
    never forwarded: a hook registry found on ``inner`` would attach a hook (Skip, a cache) to a
    forward the wrapper never calls (an exported graph runs instead), and the hook would silently
    never run.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules") or {}
            if "inner" not in modules or name.startswith("_"):
                raise
            return getattr(modules["inner"], name)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the wrapper takes and returns: what a pipeline makes its latents in."""
        return torch.float32


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor inside tuples, lists, dicts and diffusers outputs."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        mapped = {k: _map_tensors(v, fn) for k, v in value.items()}
        return mapped if type(value) is dict else type(value)(**mapped)
    return value


class CastModule(_Wrapper):
    """``inner`` in a low-precision ``dtype`` behind float32 inputs and outputs.

    Why a wrapper: a pipeline makes its latents and text embeddings in the text encoder's dtype;
    casting only the denoiser would make every call a dtype mismatch.
    """

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        import logging

        logger = logging.getLogger("diffusers.models.modeling_utils")  # "cast with from_pretrained" advice
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            super().__init__(inner.to(dtype))
        finally:
            logger.setLevel(level)
        self.compute_dtype = dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        def down(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.compute_dtype) if t.is_floating_point() else t

        def up(t: torch.Tensor) -> torch.Tensor:
            return t.float() if t.is_floating_point() else t

        return _map_tensors(self.inner(*_map_tensors(args, down), **_map_tensors(kwargs, down)), up)


@dataclass
class _Runner:
    """One exported graph for one call structure: run it, and rebuild the original output type."""

    run: Callable[[list[Any]], Any]
    form: tuple[Any, ...]


class _Flat(nn.Module):
    """``inner`` as a function of its tensor arguments only (what tracing exporters need)."""

    def __init__(self, inner: nn.Module, template: list[tuple[str, str, Any]], names: list[str]) -> None:
        super().__init__()
        self.inner, self.template, self.names = inner, template, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        out = self.inner(**_rebuild(self.template, dict(zip(self.names, tensors, strict=True))))
        return _only_tensor(out)


def _only_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    values = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (tuple, list)) else None
    if values is None or len(values) != 1 or not isinstance(values[0], torch.Tensor):
        raise StepsaverError(f"cannot export a module returning {type(out).__name__} with "
                             f"{len(values) if values is not None else '?'} outputs; only one-tensor outputs")
    return values[0]


def _arrays(tensors: Sequence[torch.Tensor]) -> list[Any]:
    return [t.detach().cpu().contiguous().numpy() for t in tensors]


def _form(out: Any) -> tuple[Any, ...]:
    if isinstance(out, torch.Tensor):
        return ("tensor",)
    if isinstance(out, dict):
        return ("dict", type(out), next(iter(out.keys())))
    return ("tuple", type(out))


def _reform(form: tuple[Any, ...], tensor: torch.Tensor) -> Any:
    if form[0] == "tensor":
        return tensor
    if form[0] == "dict":
        return form[1](**{form[2]: tensor})
    return form[1]([tensor])


def _flatten(arguments: dict[str, Any]) -> tuple[list[tuple[str, str, Any]], list[str], list[torch.Tensor]]:
    """Bound arguments -> (a template to rebuild them, tensor input names, the tensors)."""
    template: list[tuple[str, str, Any]] = []
    names: list[str] = []
    tensors: list[torch.Tensor] = []

    def add(name: str, value: torch.Tensor) -> None:
        names.append(name)
        tensors.append(value)

    for name, value in arguments.items():
        if isinstance(value, torch.Tensor):
            template.append((name, "tensor", None))
            add(name, value)
        elif isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values()):
            keys = []
            for k, v in value.items():
                if not isinstance(v, torch.Tensor):
                    raise StepsaverError(f"cannot export argument {name}[{k!r}] of type {type(v).__name__}")
                keys.append(k)
                add(f"{name}.{k}", v)
            template.append((name, "dict", tuple(keys)))
        elif isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
            for i, v in enumerate(value):
                add(f"{name}.{i}", v)
            template.append((name, "seq", len(value)))
        elif value is None or isinstance(value, (bool, int, float, str)) or \
                (isinstance(value, dict) and all(isinstance(v, (bool, int, float, str)) for v in value.values())):
            template.append((name, "const", value))
        else:
            raise StepsaverError(f"cannot export argument {name!r} of type {type(value).__name__}")
    return template, names, tensors


def _frozen(value: Any) -> Any:
    """A hashable stand-in for a constant argument (a dict of scalars, e.g. ``joint_attention_kwargs``)."""
    return tuple(sorted((k, _frozen(v)) for k, v in value.items())) if isinstance(value, dict) else value


def _rebuild(template: list[tuple[str, str, Any]], by_name: dict[str, torch.Tensor]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for name, kind, payload in template:
        if kind == "tensor":
            kwargs[name] = by_name[name]
        elif kind == "dict":
            kwargs[name] = {k: by_name[f"{name}.{k}"] for k in payload}
        elif kind == "seq":
            kwargs[name] = tuple(by_name[f"{name}.{i}"] for i in range(payload))
        else:
            kwargs[name] = payload
    return kwargs


class ExportedModule(_Wrapper):
    """``inner`` run by ONNX Runtime or OpenVINO, callable exactly like ``inner``.

    Each distinct call structure (which arguments are tensors, their dtypes and non-batch shapes,
    the constant arguments such as ``return_dict``) is traced and exported on its first call, with
    the batch dimension dynamic, so CFG on/off, a batch of 8 or the rows Skip computes reuse one
    graph. The output is rebuilt in the type ``inner`` returned (a tensor, a tuple, a diffusers
    output). ``inner`` stays in float32 eager form: it is what gets exported, and it answers
    attribute look-ups (``config``...).
    """

    BACKENDS = ("onnxruntime", "openvino")

    def __init__(self, inner: nn.Module, backend: str) -> None:
        if backend not in self.BACKENDS:
            raise StepsaverError(f"unknown export backend {backend!r}; use one of {', '.join(self.BACKENDS)}")
        super().__init__(inner.eval())
        self.backend = backend
        self._signature = inspect.signature(inner.forward)
        self._runners: dict[tuple[Any, ...], _Runner] = {}
        self._per_batch: set[tuple[Any, ...]] = set()  # call structures whose graphs hold the batch size

    @property
    def exported_graphs(self) -> int:
        """How many call structures have been exported so far (1 for a steady pipeline)."""
        return len(self._runners)

    def _arguments(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        out: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = self._signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise StepsaverError(f"cannot export {type(self.inner).__name__}: extra positional arguments")
            elif kind is inspect.Parameter.VAR_KEYWORD:
                out.update(value)
            else:
                out[name] = value
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        template, names, tensors = _flatten(self._arguments(args, kwargs))
        batch = tensors[0].shape[0] if tensors and tensors[0].dim() else None
        dynamic = [t.dim() > 0 and batch is not None and t.shape[0] == batch for t in tensors]
        key = (tuple((n, k, _frozen(p) if k == "const" else None) for n, k, p in template),
               tuple((n, str(t.dtype), tuple(t.shape[1:]) if d else tuple(t.shape), d)
                     for n, t, d in zip(names, tensors, dynamic, strict=True)))
        if key in self._per_batch:
            key = (*key, batch)
        runner = self._runners.get(key)
        if runner is None:
            runner = self._export(template, names, tensors, dynamic)
            if any(dynamic) and not self._serves_other_batches(runner, template, names, tensors, dynamic):
                # the graph holds this batch size as a constant: one graph per batch size from now on
                self._per_batch.add(key)
                key = (*key, batch)
                runner = self._export(template, names, tensors, [False] * len(tensors))
            self._runners[key] = runner
        return _reform(runner.form, torch.from_numpy(runner.run(_arrays(tensors))))

    def _serves_other_batches(self, runner: _Runner, template: list, names: list[str], tensors: list[torch.Tensor],
                              dynamic: list[bool]) -> bool:
        """Whether the graph exported with a dynamic batch gives eager's answer at another batch size.

        Why: the tracer records some shape arithmetic as constants. diffusers' rotary embedding
        (``apply_rotary_emb``: ``x.reshape(*x.shape[:-1], -1, 2)``) puts the traced batch size into
        a Reshape, so Flux's graph traced at batch 1 failed at batch 8 in ONNX Runtime, and a graph
        that runs but mixes rows would be worse. One eager and one exported call at batch 3 (rows
        of this call repeated) tell; a graph that fails them is exported once per batch size.
        """
        rows = torch.arange(3) % tensors[0].shape[0]
        probe = [t.detach()[rows] if d else t for t, d in zip(tensors, dynamic, strict=True)]
        try:
            with torch.no_grad():
                want = _only_tensor(self.inner(**_rebuild(template, dict(zip(names, probe, strict=True)))))
            got = torch.from_numpy(runner.run(_arrays(probe)))
        except Exception:  # noqa: BLE001 - any failure at batch 3 means the batch is not symbolic
            return False
        if got.shape != want.shape or not torch.isfinite(got).all():
            return False
        return bool((got - want.float()).abs().max() <= EXPORT_BATCH_ATOL * max(1.0, float(want.abs().max())))

    def _export(self, template: list, names: list[str], tensors: list[torch.Tensor], dynamic: list[bool]) -> _Runner:
        with torch.inference_mode(False), torch.no_grad():
            example = tuple(t.detach().clone().contiguous() for t in tensors)  # normal tensors, not inference ones
            form = _form(self.inner(**_rebuild(template, dict(zip(names, example, strict=True)))))
            flat = _Flat(self.inner, template, names).eval()
            threads = max(1, torch.get_num_threads())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if self.backend == "onnxruntime":
                    return _Runner(_onnxruntime_runner(flat, example, names, dynamic, threads), form)
                return _Runner(_openvino_runner(flat, example, threads), form)


ONNX_OPSET = 17
# an exported graph run at another batch size must be this close to eager (relative to the output's scale)
EXPORT_BATCH_ATOL = 1e-3


def _rms_norm_symbolic(g: Any, x: Any, normalized_shape: Any, weight: Any, eps: Any) -> Any:
    """``aten::rms_norm`` as ONNX ops of opset 17: ``x / sqrt(mean(x^2 over the last dims) + eps) * weight``.

    Why: diffusers' ``RMSNorm`` (Flux's and SD3's query/key norms) calls ``torch.nn.functional.rms_norm``,
    which the TorchScript exporter has no opset-17 symbolic for (ONNX has RMSNormalization only from
    opset 23, which ONNX Runtime's CPU kernels and OpenVINO do not all take), so the export failed.
    ``eps`` left out is torch's default, the machine epsilon of float32 (the dtype every export here runs in).
    """
    from torch.onnx import symbolic_helper as sh

    dims = sh._get_const(normalized_shape, "is", "normalized_shape")
    value = None if sh._is_none(eps) else sh._get_const(eps, "f", "eps")
    eps_value = torch.finfo(torch.float32).eps if value is None else float(value)
    axes = list(range(-len(dims), 0))
    square = g.op("Mul", x, x)
    mean = g.op("ReduceMean", square, axes_i=axes, keepdims_i=1)
    rms = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps_value, dtype=torch.float32))))
    out = g.op("Div", x, rms)
    return out if sh._is_none(weight) else g.op("Mul", out, weight)


def _ensure_onnx_symbolics() -> None:
    """Register the symbolics the export needs and torch lacks (:func:`_rms_norm_symbolic`), once.

    Registered for the process, not just for our export: unregistering leaves torch's registry with an
    empty entry whose later lookups fail with a confusing error, and a correct decomposition of an op
    torch cannot export otherwise only helps a user's own export. One already registered (the user's,
    or a later torch's) is left alone.
    """
    try:
        from torch.onnx._internal.torchscript_exporter.registration import registry
        if registry.is_registered_op("aten::rms_norm", ONNX_OPSET):
            return
    except (ImportError, AttributeError):  # another torch layout: registering again only overrides ours
        pass
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, ONNX_OPSET)


def _onnx_file(flat: nn.Module, example: tuple, names: list[str], dynamic: list[bool], folder: Path) -> Path:
    """Trace ``flat`` to ``folder/model.onnx`` with a dynamic batch (a file, not bytes: models over 2 GB
    need external data files)."""
    axes = {n: {0: "batch"} for n, d in zip(names, dynamic, strict=True) if d}
    axes["out"] = {0: "batch"}
    path = folder / "model.onnx"
    _ensure_onnx_symbolics()
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(flat, example, str(path), dynamo=False, input_names=names, output_names=["out"],
                          dynamic_axes=axes, opset_version=ONNX_OPSET)
    return path


def _onnxruntime_runner(flat: nn.Module, example: tuple, names: list[str], dynamic: list[bool],
                        threads: int) -> Callable[[list[Any]], Any]:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="stepsaver-onnx-") as tmp:
        path = _onnx_file(flat, example, names, dynamic, Path(tmp))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # fatal only: the batch probe (ExportedModule._serves_other_batches) expects some graphs to fail,
        # and a failure the caller should see raises anyway
        options.log_severity_level = 4
        # no busy-waiting between runs: ORT's pool otherwise spins after each call and starves the torch work
        # around it (measured, tiny UNet at 2 threads: an eager call timed right after an ORT call took
        # 94 ms with spinning, 37 ms without, 29-51 ms alone), which also inflated the lever's ratio
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    wanted = [i.name for i in session.get_inputs()]  # the exporter drops inputs the graph never reads
    index = {n: i for i, n in enumerate(names)}

    def run(arrays: list[Any]) -> Any:
        return session.run(None, {n: arrays[index[n]] for n in wanted})[0]

    return run


def _openvino_runner(flat: nn.Module, example: tuple, threads: int) -> Callable[[list[Any]], Any]:
    """OpenVINO's own PyTorch frontend, not the ONNX file: it builds in ~10 s where reading the ONNX
    takes ~1 s, but the graph it makes ran the embedded UNet ~1.3x faster (fused normalisation and
    attention patterns the traced ONNX spells out op by op)."""
    import numpy as np
    import openvino as ov

    model = ov.convert_model(flat, example_input=example)
    if len(model.inputs) != len(example):
        raise StepsaverError(f"OpenVINO kept {len(model.inputs)} of the {len(example)} inputs; cannot feed it")
    # f32 pinned: on a bf16-capable CPU OpenVINO would otherwise switch precision by itself
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                      "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()

    def run(arrays: list[Any]) -> Any:
        return np.array(request.infer(arrays)[compiled.outputs[0]], copy=True)  # the request reuses its buffer

    return run


# ---- levers ----------------------------------------------------------------------------------------
@dataclass
class Parts:
    """What a lever changes: the denoiser, and the VAE where the lever applies to its decoder (else None)."""

    denoiser: nn.Module
    vae: nn.Module | None


@dataclass
class Call:
    """One captured denoiser call (tensors cloned out of inference mode), for timing and sensitivity."""

    args: tuple
    kwargs: dict

    def __call__(self, module: nn.Module) -> Any:
        with torch.inference_mode():
            return module(*self.args, **self.kwargs)


@dataclass
class LeverContext:
    """What a lever may read: captured denoiser calls, and the parameters of an earlier run to re-apply."""

    calls: list[Call] = field(default_factory=list)
    params: dict[str, Any] | None = None
    log: Callable[[str], None] = lambda _m: None


@dataclass(frozen=True)
class Lever:
    """One way to make the denoiser faster.

    ``apply(parts, ctx)`` changes ``parts`` in place (or swaps its modules) and returns the
    parameters :func:`apply_levers` needs to do the same again at load time. ``needs`` names a
    Python module it imports; ``unavailable`` is a fixed reason it never runs here.
    """

    name: str
    summary: str
    group: str
    apply: Callable[[Parts, LeverContext], dict[str, Any]]
    vae: bool = True
    needs: str | None = None
    unavailable: str | None = None

    def missing(self) -> str | None:
        """Why this lever cannot run here, or None."""
        if self.unavailable:
            return self.unavailable
        if self.needs:
            import importlib.util

            if importlib.util.find_spec(self.needs) is None:
                return f"not installed: `pip install {self.needs}` (or the extra: pip install -e '.[optimize]')"
        return None


def _channels_last(parts: Parts, ctx: LeverContext) -> dict[str, Any]:
    parts.denoiser = parts.denoiser.to(memory_format=torch.channels_last)
    if parts.vae is not None:
        parts.vae = parts.vae.to(memory_format=torch.channels_last)
    return {}


def _compile(parts: Parts, ctx: LeverContext) -> dict[str, Any]:
    backend = (ctx.params or {}).get("backend", COMPILE_BACKEND)
    parts.denoiser.compile(backend=backend)
    if parts.vae is not None:
        parts.vae.decoder.compile(backend=backend)
    return {"backend": backend}


def _bf16(parts: Parts, ctx: LeverContext) -> dict[str, Any]:
    parts.denoiser = CastModule(parts.denoiser, torch.bfloat16)
    if parts.vae is not None:
        parts.vae.decoder = CastModule(parts.vae.decoder, torch.bfloat16)
    return {}


def _int8_layers(module: nn.Module) -> list[str]:
    """Layers torch.ao can quantise dynamically: Linear, and plain Conv2d."""
    return [n for n, m in module.named_modules()
            if type(m) is nn.Linear or (type(m) is nn.Conv2d and m.padding_mode == "zeros")]


def _int8_layer(layer: nn.Module) -> nn.Module:
    from torch.ao.nn.quantized import dynamic as qd
    from torch.ao.quantization import default_dynamic_qconfig

    layer.qconfig = default_dynamic_qconfig
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return (qd.Linear if isinstance(layer, nn.Linear) else qd.Conv2d).from_float(layer)
    finally:
        del layer.qconfig


def _swap(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def _quantise(module: nn.Module, names: Sequence[str]) -> nn.Module:
    for name in names:
        _swap(module, name, _int8_layer(module.get_submodule(name)))
    return module


def _int8(parts: Parts, ctx: LeverContext) -> dict[str, Any]:
    names = _int8_layers(parts.denoiser)
    _quantise(parts.denoiser, names)
    return {"int8_layers": len(names)}


def _relative_error(module: nn.Module, calls: Sequence[Call], references: Sequence[torch.Tensor]) -> float:
    errors = []
    for call, ref in zip(calls, references, strict=True):
        out = _only_tensor(call(module)).float()
        errors.append(float((out - ref).norm() / ref.norm().clamp_min(1e-12)))
    return max(errors)


def _int8_selective(parts: Parts, ctx: LeverContext) -> dict[str, Any]:
    """Quantise the least sensitive layers, as many as keep the output error within the budget.

    Sensitivity is measured layer by layer (that layer alone int8) on one captured call, the
    middle step (one forward per layer is the cost); the number of layers is then chosen by
    bisection on the *measured* error of the whole prefix on two calls (early and middle),
    because layer errors do not simply add.
    """
    model = parts.denoiser
    if ctx.params is not None and "int8_layers" in ctx.params:
        _quantise(model, ctx.params["int8_layers"])
        return dict(ctx.params)
    if not ctx.calls:
        raise StepsaverError("int8_selective needs captured denoiser calls to measure sensitivity")
    calls = ctx.calls[:2]
    references = [_only_tensor(c(model)).float() for c in calls]
    sensitivity: dict[str, float] = {}
    for name in _int8_layers(model):
        old = _swap(model, name, _int8_layer(model.get_submodule(name)))
        sensitivity[name] = _relative_error(model, calls[-1:], references[-1:])
        _swap(model, name, old)
    order = sorted(sensitivity, key=sensitivity.get)

    measured: dict[int, float] = {0: 0.0}

    def error_of(k: int) -> float:
        if k not in measured:
            measured[k] = _relative_error(_quantise(copy.deepcopy(model), order[:k]), calls, references)
        return measured[k]

    lo, hi = 0, len(order)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if error_of(mid) <= SELECTIVE_BUDGET:
            lo = mid
        else:
            hi = mid - 1
    chosen, error = order[:lo], error_of(lo)
    _quantise(model, chosen)
    worst = sorted(sensitivity.items(), key=lambda kv: -kv[1])[:8]
    ctx.log(f"int8_selective: {lo} of {len(order)} layers int8 (output error {error:.4f}), the rest float")
    return {"int8_layers": chosen, "float_layers": len(order) - lo, "budget": SELECTIVE_BUDGET,
            "output_error": round(error, 6), "most_sensitive": {n: round(s, 6) for n, s in worst}}


def _exported(backend: str) -> Callable[[Parts, LeverContext], dict[str, Any]]:
    def apply(parts: Parts, ctx: LeverContext) -> dict[str, Any]:
        parts.denoiser = ExportedModule(parts.denoiser, backend)
        if parts.vae is not None:
            parts.vae.decoder = ExportedModule(parts.vae.decoder, backend)
        return {}

    apply.__name__ = f"_{backend}"
    return apply


def _never(parts: Parts, ctx: LeverContext) -> dict[str, Any]:  # pragma: no cover - never called
    raise StepsaverError("optimum_intel is a report line, not a runnable lever")


LEVERS: dict[str, Lever] = {lever.name: lever for lever in (
    Lever("channels_last", "NHWC memory format for the convolutions", "layout", _channels_last),
    Lever("int8", "dynamic int8 (torch.ao) of every Linear and Conv2d of the denoiser", "precision", _int8,
          vae=False),
    Lever("int8_selective", "dynamic int8 of the least sensitive layers; the rest stay float", "precision",
          _int8_selective, vae=False),
    Lever("bf16", "bfloat16 weights behind a float32 cast", "precision", _bf16),
    Lever("compile", "torch.compile (Inductor), in place", "graph", _compile),
    Lever("onnxruntime", "traced ONNX export run by ONNX Runtime (CPU, fp32)", "runtime", _exported("onnxruntime"),
          needs="onnxruntime"),
    Lever("openvino", "traced export run by OpenVINO (CPU, fp32)", "runtime", _exported("openvino"),
          needs="openvino"),
    Lever("optimum_intel", "OpenVINO through optimum-intel", "runtime", _never, unavailable=OPTIMUM_INTEL_NOTE),
)}
STACK_ORDER = ("layout", "precision", "graph")
"""How kept torch levers combine: one per group, in this order (compile last, over what it compiles)."""


def _stack(kept: dict[str, dict[str, Any]], records: list[dict[str, Any]], psnr_min: float,
           lpips_max: float) -> list[str]:
    """The levers to try together: the fastest kept lever of each group of :data:`STACK_ORDER`.

    One exception, when a graph compiler (``compile``) is kept and no precision is: the fastest
    precision that kept quality but was too slow alone joins the stack. Why: what makes a precision
    slow in eager mode is mostly per-operator work the compiler removes (bf16's casts around every
    op, at batch 1 where the matmuls are too small to gain); measured on tiny-flux, bf16 alone was
    0.88x at batch 1 and 1.23x at batch 8, bf16 under compile about 2x at both. The combination is
    judged by the same rule as any lever, so this costs one more compilation, never a worse choice.
    """
    def fastest(names: list[str], by: dict[str, dict[str, Any]]) -> list[str]:
        return [max(names, key=lambda n: by[n]["speedup"])] if names else []

    compiled = any(LEVERS[n].group == "graph" for n in kept)
    stack: list[str] = []
    for group in STACK_ORDER:
        in_group = [n for n in kept if LEVERS[n].group == group]
        if not in_group and group == "precision" and compiled:
            lossless = {r["lever"]: r for r in records if r["status"] == "dropped" and LEVERS[r["lever"]].group == group
                        and r["psnr_min"] >= psnr_min and r["lpips_max"] <= lpips_max}
            stack += fastest(list(lossless), lossless)
        else:
            stack += fastest(in_group, kept)
    return stack


def _lever(name: str) -> Lever:
    if name not in LEVERS:
        raise StepsaverError(f"unknown lever {name!r}; the levers are: {', '.join(LEVERS)}")
    return LEVERS[name]


def parse_levers(text: str | Sequence[str] | None) -> list[str]:
    """``"all"``/None -> every lever; a comma list (or a list) -> those, checked, in registry order."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "all")):
        return list(LEVERS)
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    for n in names:
        _lever(n)
    return [n for n in LEVERS if n in names]


# ---- applying levers to a pipeline -----------------------------------------------------------------
def _denoiser_name(pipe: Any) -> str:
    for name in ("unet", "transformer"):
        if isinstance(getattr(pipe, name, None), nn.Module):
            return name
    raise StepsaverError(f"{type(pipe).__name__} has no `unet` or `transformer` denoiser to optimise")


def _build(pipe: Any, names: Sequence[str], vae_for: Callable[[str], bool], params: dict[str, dict],
           calls: list[Call], log: Callable[[str], None]) -> tuple[Parts, dict[str, dict]]:
    """Fresh copies of the denoiser (and VAE where a lever touches it) with ``names`` applied in order."""
    dname = _denoiser_name(pipe)
    touch_vae = getattr(pipe, "vae", None) is not None and any(_lever(n).vae and vae_for(n) for n in names)
    parts = Parts(copy.deepcopy(getattr(pipe, dname)), copy.deepcopy(pipe.vae) if touch_vae else None)
    used: dict[str, dict] = {}
    for name in names:
        lever = _lever(name)
        vae = parts.vae
        if not (lever.vae and vae_for(name)):
            parts.vae = None
        used[name] = lever.apply(parts, LeverContext(calls=calls, params=params.get(name), log=log))
        if parts.vae is None:
            parts.vae = vae
    return parts, used


@contextlib.contextmanager
def _installed(pipe: Any, parts: Parts) -> Iterator[None]:
    """``pipe`` runs ``parts`` for the block; its own modules are back afterwards, whatever happened."""
    dname = _denoiser_name(pipe)
    denoiser, vae = getattr(pipe, dname), getattr(pipe, "vae", None)
    setattr(pipe, dname, parts.denoiser)
    if parts.vae is not None:
        pipe.vae = parts.vae
    try:
        yield
    finally:
        setattr(pipe, dname, denoiser)
        if parts.vae is not None:
            pipe.vae = vae


def apply_levers(pipe: Any, names: Sequence[str], params: dict[str, dict] | None = None,
                 vae: dict[str, bool] | None = None) -> Any:
    """Put ``names`` (with their saved ``params``) on ``pipe``'s denoiser and VAE decoder; returns ``pipe``.

    ``vae[name]`` False leaves the decoder alone for that lever (optimize drops a lever's decoder
    part where it was slower). Compiled and exported graphs are built again, on the first call.
    """
    for name in names:
        missing = _lever(name).missing()
        if missing:
            raise StepsaverError(f"lever {name} cannot run here: {missing}")
    vae = vae or {}
    parts, _ = _build(pipe, names, lambda n: vae.get(n, True), params or {}, [], lambda _m: None)
    setattr(pipe, _denoiser_name(pipe), parts.denoiser)
    if parts.vae is not None:
        pipe.vae = parts.vae
    return pipe


# ---- measuring -------------------------------------------------------------------------------------
class Timer(Protocol):
    """Times ``candidate`` against ``eager`` in one run; returns (eager seconds, candidate seconds).

    Injectable so tests can make keep/drop decisions deterministic.
    """

    def pair(self, lever: str, part: str, eager: Callable[[], Any],
             candidate: Callable[[], Any]) -> tuple[float, float]:
        ...


@dataclass
class PairedTimer:
    """Medians of ``repeats`` interleaved calls (eager, candidate, candidate, eager, ...) after warm-up.

    Interleaving makes a contended machine slow both sides alike; warm-up calls absorb
    compilation and export, which are reported as build time instead.
    """

    repeats: int = 10
    warmup: int = 2

    def pair(self, lever: str, part: str, eager: Callable[[], Any],
             candidate: Callable[[], Any]) -> tuple[float, float]:
        eager()
        for _ in range(self.warmup):
            candidate()
        times: dict[bool, list[float]] = {True: [], False: []}
        for i in range(self.repeats):
            for is_eager in ((True, False) if i % 2 == 0 else (False, True)):
                fn = eager if is_eager else candidate
                t0 = time.perf_counter()
                fn()
                times[is_eager].append(time.perf_counter() - t0)
        return statistics.median(times[True]), statistics.median(times[False])


def default_prompts(n: int = 4) -> list[str]:
    """A few captions of the embedded model's training scenes (seed 3, train split): in-domain prompts."""
    from stepsaver.scenes import SceneGenerator

    scenes = SceneGenerator(seed=3, split="train")
    return [scenes.sample(i).caption for i in range(n)]


def _cloned_call(args: tuple, kwargs: dict) -> Call:
    """A denoiser call's arguments, cloned outside inference mode so they outlive the pipeline call."""
    with torch.inference_mode(False):
        return Call(_map_tensors(args, lambda t: t.detach().clone()),
                    _map_tensors(dict(kwargs), lambda t: t.detach().clone()))


def _capture(pipe: Any, prompt: str, steps: int, seed: int, guidance: float,
             call_kwargs: dict[str, Any]) -> tuple[list[Any], list[Call], Call | None]:
    """The eager images of ``prompt`` and three of its denoiser calls (early, middle, late) plus one
    decoder call, cloned so they outlive inference mode."""
    from stepsaver.generation import generate_images

    calls: list[Call] = []
    decoder: list[Call] = []

    def on_denoiser(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append(_cloned_call(args, kwargs))

    def on_decoder(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        if not decoder:
            decoder.append(_cloned_call(args, kwargs))

    handles = [getattr(pipe, _denoiser_name(pipe)).register_forward_pre_hook(on_denoiser, with_kwargs=True)]
    if getattr(getattr(pipe, "vae", None), "decoder", None) is not None:
        handles.append(pipe.vae.decoder.register_forward_pre_hook(on_decoder, with_kwargs=True))
    try:
        result = generate_images(pipe, [prompt], steps=steps, seeds=[seed], guidance=guidance, batch_size=1,
                                 **call_kwargs)[0]
    finally:
        for h in handles:
            h.remove()
    if not calls:
        raise StepsaverError("the pipeline never called its denoiser; cannot optimise it")
    picked = [calls[0], calls[len(calls) // 2], calls[-1]]
    return result.images, picked, decoder[0] if decoder else None


def _capture_batch(pipe: Any, prompts: Sequence[str], batch: int, seed: int, guidance: float,
                   call_kwargs: dict[str, Any]) -> Call:
    """The first denoiser call of a real batch-``batch`` pipeline call (one step, latents out).

    Captured from the pipeline rather than tiled from a batch-1 call: only the pipeline knows
    which arguments carry the batch (Flux's position ids do not).
    """
    from stepsaver.generation import generate_images

    captured: list[Call] = []

    def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not captured:
            captured.append(_cloned_call(args, kwargs))

    chunk = [prompts[i % len(prompts)] for i in range(batch)]
    handle = getattr(pipe, _denoiser_name(pipe)).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        generate_images(pipe, chunk, steps=1, seeds=[seed + i for i in range(batch)], guidance=guidance,
                        batch_size=batch, **{**call_kwargs, "output_type": "latent"})
    finally:
        handle.remove()
    if not captured:
        raise StepsaverError("the pipeline never called its denoiser; cannot time it")
    return captured[0]


def _images(pipe: Any, prompts: Sequence[str], steps: int, seed: int, guidance: float,
            call_kwargs: dict[str, Any]) -> list[Any]:
    """One image per prompt, one prompt per call: the shape optimize timed (no recompiles)."""
    from stepsaver.generation import generate_images

    results = generate_images(pipe, list(prompts), steps=steps, seeds=[seed + i for i in range(len(prompts))],
                              guidance=guidance, batch_size=1, **call_kwargs)
    return [r.images[0] for r in results]


def _scores(images: Sequence[Any], reference: Sequence[Any]) -> dict[str, Any]:
    """Per-prompt PSNR (capped at 100 dB: identical images) and LPIPS-Alex of ``images`` vs ``reference``."""
    from stepsaver.measure.lpips import lpips_distance
    from stepsaver.measure.quality import psnr, to_float_nchw

    x, y = to_float_nchw(list(images)), to_float_nchw(list(reference))
    p = psnr(x, y).clamp(max=PSNR_CAP).nan_to_num(nan=0.0)
    d = lpips_distance(x * 2 - 1, y * 2 - 1).flatten().nan_to_num(nan=1.0)
    return {"psnr": round(float(p.mean()), 3), "psnr_min": round(float(p.min()), 3),
            "lpips": round(float(d.mean()), 6), "lpips_max": round(float(d.max()), 6),
            "psnr_per_prompt": [round(float(v), 3) for v in p], "lpips_per_prompt": [round(float(v), 6) for v in d]}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")[:300]


# ---- the search --------------------------------------------------------------------------------------
@dataclass
class OptimizeResult:
    """Every lever's measurements and verdict, the combination, and the chosen setting."""

    levers: list[dict[str, Any]]
    combination: dict[str, Any] | None
    chosen: list[str]
    params: dict[str, dict[str, Any]]
    vae: dict[str, bool]
    eager: dict[str, Any]
    machine: dict[str, Any]
    settings: dict[str, Any]
    seconds: float

    @property
    def chosen_record(self) -> dict[str, Any] | None:
        """The measurements of the chosen setting (a lever's or the combination's); None if eager won."""
        if not self.chosen:
            return None
        if self.combination is not None and self.combination["levers"] == self.chosen:
            return self.combination
        return next(r for r in self.levers if r["lever"] == self.chosen[0])

    def to_dict(self) -> dict[str, Any]:
        best = self.chosen_record
        return {"format": FORMAT, "chosen": self.chosen,
                "chosen_speedup": best["speedup"] if best else 1.0,
                "params": self.params, "vae": {k: v for k, v in self.vae.items() if k in self.chosen},
                "levers": self.levers, "combination": self.combination, "eager": self.eager,
                "machine": self.machine, "settings": self.settings, "seconds": round(self.seconds, 2),
                "rule": f"kept when speedup >= {self.settings['min_speedup']} (median per-iteration latency, "
                        f"interleaved with eager fp32, at the worst of batch "
                        f"{', '.join(str(b) for b in self.settings.get('batch_sizes', [1]))}) "
                        f"and every prompt has PSNR >= {self.settings['psnr_min']} dB "
                        f"and LPIPS <= {self.settings['lpips_max']} vs the eager fp32 image"}


def _worst_of(record: dict[str, Any]) -> str:
    """" (worst of batch 1 1.93x, 8 1.17x)" where several batch sizes were timed; "" otherwise."""
    per = record.get("per_batch") or {}
    if len(per) < 2:
        return ""
    return " (worst of " + ", ".join(f"batch {b} {v['speedup']:.2f}x" for b, v in per.items()) + ")"


def _verdict(record: dict[str, Any], min_speedup: float, psnr_min: float, lpips_max: float) -> None:
    fast = record["speedup"] >= min_speedup
    good = record["psnr_min"] >= psnr_min and record["lpips_max"] <= lpips_max
    quality = f"worst PSNR {record['psnr_min']:.1f} dB, worst LPIPS {record['lpips_max']:.4f}"
    if fast and good:
        record.update(status="kept", reason=f"{record['speedup']:.2f}x faster per iteration{_worst_of(record)}; "
                                            f"{quality}")
        return
    why = []
    if not fast:
        why.append(f"not faster ({record['speedup']:.2f}x{_worst_of(record)} < {min_speedup:.2f}x needed)")
    if not good:
        bad = []
        if record["psnr_min"] < psnr_min:
            bad.append(f"PSNR {record['psnr_min']:.1f} < {psnr_min:g} dB")
        if record["lpips_max"] > lpips_max:
            bad.append(f"LPIPS {record['lpips_max']:.4f} > {lpips_max:g}")
        why.append("quality lost (" + ", ".join(bad) + ")")
    record.update(status="dropped", reason="; ".join(why))


def optimize_pipeline(pipe: Any, prompts: Sequence[str] | None = None, *, levers: str | Sequence[str] | None = None,
                      steps: int = 20, seed: int = 0, guidance: float = 5.0, repeats: int = 10,
                      min_speedup: float = MIN_SPEEDUP, psnr_min: float = PSNR_MIN, lpips_max: float = LPIPS_MAX,
                      timer: Timer | None = None, log: Callable[[str], None] | None = None,
                      progress: Callable[[str, int, int], None] | None = None,
                      batch_sizes: Sequence[int] = (1,), **call_kwargs: Any) -> OptimizeResult:
    """Try each lever on ``pipe`` (a CPU float32 diffusers pipeline), keep what is faster and lossless.

    ``pipe`` is left exactly as it came (levers run on copies); apply the result with
    :func:`apply_levers` or save it with :func:`save_optimized`. ``prompts`` default to
    :func:`default_prompts`; prompt ``i`` is rendered with seed ``seed + i`` at ``steps`` steps.
    ``timer`` replaces the latency measurement (tests inject fixed numbers); ``progress(what,
    done, total)`` is called as each stage starts. ``batch_sizes``: the prompts per pipeline call
    you serve; each lever is timed at each (a call captured from a real pipeline call of that
    batch) and judged by its worst speedup, so the choice holds at all of them. Extra keyword
    arguments go to the pipeline.
    """
    from stepsaver.generation import validate_request
    from stepsaver.skip.hook import skip_enabled

    started = time.perf_counter()
    log = log or (lambda _m: None)
    names = parse_levers(levers)
    prompts = list(prompts) if prompts is not None else default_prompts()
    if not prompts:
        raise StepsaverError("optimize needs at least one calibration prompt")
    for p in prompts:
        validate_request(p, steps, guidance)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise StepsaverError(f"repeats must be an integer >= 1, got {repeats!r}")
    sizes = list(dict.fromkeys(batch_sizes)) if not isinstance(batch_sizes, (int, str)) else None
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise StepsaverError(f"batch sizes must be integers >= 1 (e.g. [1, 8]), got {batch_sizes!r}")
    if not (isinstance(min_speedup, (int, float)) and math.isfinite(min_speedup) and min_speedup > 0):
        raise StepsaverError(f"min speedup must be a finite number > 0, got {min_speedup!r}")
    dname = _denoiser_name(pipe)
    denoiser = getattr(pipe, dname)
    device = getattr(pipe, "device", torch.device("cpu"))
    if torch.device(device).type != "cpu":
        raise StepsaverError(f"optimize measures CPU levers; load the model with device='cpu' (got {device})")
    dtypes = {p.dtype for p in denoiser.parameters()}
    if dtypes != {torch.float32}:
        raise StepsaverError(f"optimize compares against eager float32; load the model with dtype='float32' "
                             f"(its denoiser is {', '.join(sorted(str(d) for d in dtypes))})")
    if skip_enabled(pipe):
        raise StepsaverError("adaptive skip is enabled on this pipeline; optimise the plain pipeline "
                             "(disable_adaptive_skip(pipe)) and enable Skip on the optimised one")
    timer = timer or PairedTimer(repeats=repeats)
    bar = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    pipe.set_progress_bar_config(disable=True)
    try:
        return _optimize(pipe, prompts, names, steps, seed, guidance, repeats, min_speedup, psnr_min, lpips_max,
                         timer, log, progress, call_kwargs, started, sizes)
    finally:
        pipe._progress_bar_config = bar


def _optimize(pipe: Any, prompts: list[str], names: list[str], steps: int, seed: int, guidance: float,
              repeats: int, min_speedup: float, psnr_min: float, lpips_max: float, timer: Timer,
              log: Callable[[str], None], progress: Callable[[str, int, int], None] | None,
              call_kwargs: dict[str, Any], started: float, batch_sizes: list[int]) -> OptimizeResult:
    dname = _denoiser_name(pipe)
    denoiser = getattr(pipe, dname)
    runnable = [n for n in names if not _lever(n).missing()]
    total = 2 + len(runnable) + 1
    done = [0]

    def stage(what: str) -> None:
        if progress is not None:
            progress(what, done[0], total)
        done[0] += 1

    stage("eager fp32 reference")
    first, calls, decoder_call = _capture(pipe, prompts[0], steps, seed, guidance, call_kwargs)
    reference = first + _images(pipe, prompts[1:], steps, seed + 1, guidance, call_kwargs) if prompts[1:] else first
    timed = {b: calls[1] if b == 1 else _capture_batch(pipe, prompts, b, seed, guidance, call_kwargs)
             for b in batch_sizes}

    def part(b: int) -> str:  # batch 1 keeps the name it always had
        return "denoiser" if b == 1 else f"denoiser@{b}"

    eager_vae = getattr(pipe, "vae", None)
    stage("eager latency")
    first_b = batch_sizes[0]
    eager = {"denoiser_s": timer.pair("eager", part(first_b), lambda: timed[first_b](denoiser),
                                      lambda: timed[first_b](denoiser))[0]}
    if decoder_call is not None:
        eager["vae_decoder_s"] = timer.pair("eager", "vae", lambda: decoder_call(eager_vae.decoder),
                                            lambda: decoder_call(eager_vae.decoder))[0]

    def evaluate(label: str, levers_: list[str], params: dict[str, dict], vae_for: Callable[[str], bool],
                 decide_vae: bool) -> dict[str, Any]:
        record: dict[str, Any] = {"lever" if len(levers_) == 1 else "levers": label if len(levers_) == 1 else levers_}
        t0 = time.perf_counter()
        try:
            parts, used = _build(pipe, levers_, vae_for, params, calls, log)
            record["params"] = used
            with _installed(pipe, parts):
                per_batch: dict[int, dict[str, float]] = {}
                for b in batch_sizes:
                    e, c = timer.pair(label, part(b), lambda b=b: timed[b](denoiser),
                                      lambda b=b: timed[b](parts.denoiser))
                    per_batch[b] = {"eager_s": e, "latency_s": c, "speedup": round(e / c, 4) if c > 0 else math.inf}
                worst = min(per_batch, key=lambda b: per_batch[b]["speedup"])
                # eager_s/latency_s: the first batch size's (batch 1 by default); speedup: the worst one's
                record.update(eager_s=per_batch[first_b]["eager_s"], latency_s=per_batch[first_b]["latency_s"],
                              speedup=per_batch[worst]["speedup"])
                if len(batch_sizes) > 1:
                    record["per_batch"] = per_batch
                vae_on = parts.vae is not None
                if vae_on and decoder_call is not None:
                    ve, vc = timer.pair(label, "vae", lambda: decoder_call(eager_vae.decoder),
                                        lambda: decoder_call(parts.vae.decoder))
                    record["vae_decoder"] = {"eager_s": ve, "latency_s": vc,
                                             "speedup": round(ve / vc, 4) if vc else None}
                    if decide_vae and (ve / vc if vc else math.inf) < min_speedup:
                        vae_on = False
                        record["vae_decoder"]["note"] = "decoder part dropped: not faster"
                record["vae_applied"] = vae_on
                record["build_and_time_s"] = round(time.perf_counter() - t0, 2)  # compile/export: in warm-up
                restore = contextlib.nullcontext() if vae_on or parts.vae is None else _vae_back(pipe, eager_vae)
                with restore:
                    record.update(_scores(_images(pipe, prompts, steps, seed, guidance, call_kwargs), reference))
        except Exception as exc:  # a lever that fails to build or run is reported, never fatal
            record.update(status="failed", reason=_one_line(exc), seconds=round(time.perf_counter() - t0, 2))
            log(f"{label}: failed ({record['reason']})")
            return record
        _verdict(record, min_speedup, psnr_min, lpips_max)
        record["seconds"] = round(time.perf_counter() - t0, 2)
        log(f"{label}: {record['status']} ({record['reason']})")
        return record

    records: list[dict[str, Any]] = []
    params: dict[str, dict] = {}
    vae_use: dict[str, bool] = {}
    for name in names:
        lever = _lever(name)
        missing = lever.missing()
        if missing:
            records.append({"lever": name, "summary": lever.summary, "status": "unavailable", "reason": missing})
            log(f"{name}: unavailable ({missing})")
            continue
        stage(f"lever {name}")
        record = {"lever": name, "summary": lever.summary,
                  **{k: v for k, v in evaluate(name, [name], {}, lambda _n: True, True).items() if k != "lever"}}
        records.append(record)
        if record["status"] != "failed":
            params[name] = record["params"][name]
            vae_use[name] = bool(record.get("vae_applied"))

    kept = {r["lever"]: r for r in records if r["status"] == "kept"}
    stack = _stack(kept, records, psnr_min, lpips_max)
    combination = None
    stage("combination")
    if len(stack) >= 2:
        combination = evaluate("+".join(stack), stack, params, lambda n: vae_use.get(n, False), False)
        combination["levers"] = stack
    candidates = [([n], r["speedup"]) for n, r in kept.items()]
    if combination is not None and combination.get("status") == "kept":
        candidates.append((stack, combination["speedup"]))
    chosen = max(candidates, key=lambda c: (c[1], -len(c[0])))[0] if candidates else []
    log(f"chosen: {' + '.join(chosen) if chosen else 'eager (no lever kept)'}")
    settings = {"prompts": prompts, "seed": seed, "steps": steps, "guidance": guidance, "repeats": repeats,
                "min_speedup": min_speedup, "psnr_min": psnr_min, "lpips_max": lpips_max,
                "levers_tried": names, "denoiser": f"{dname}: {type(denoiser).__name__}",
                "pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
                "batch": "1 prompt per call (the CFG pair is one denoiser call)", "batch_sizes": batch_sizes,
                "call_kwargs": {k: v for k, v in call_kwargs.items() if isinstance(v, (bool, int, float, str))}}
    return OptimizeResult(levers=records, combination=combination, chosen=chosen,
                          params={n: params[n] for n in chosen}, vae={n: vae_use.get(n, False) for n in chosen},
                          eager=eager, machine=machine_info(), settings=settings,
                          seconds=time.perf_counter() - started)


@contextlib.contextmanager
def _vae_back(pipe: Any, vae: Any) -> Iterator[None]:
    current = pipe.vae
    pipe.vae = vae
    try:
        yield
    finally:
        pipe.vae = current


# ---- the saved folder ------------------------------------------------------------------------------
def save_optimized(result: OptimizeResult, out: str | os.PathLike, pipe: Any, model: str | None = None) -> Path:
    """Write ``out/optimize.json`` (and the base pipeline under ``out/base`` where it has no other home).

    ``model`` is what the pipeline was loaded from: an embedded name or a local folder is
    referenced (with its weight fingerprint, checked at load); anything else (a hub id, an
    in-memory pipeline) is saved with ``save_pretrained`` under ``out/base``.
    """
    from stepsaver.files import write_atomically
    from stepsaver.jsonsafe import dumps
    from stepsaver.pipelines import EMBEDDED_MODELS, weights_fingerprint

    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise StepsaverError(f"--out {folder} is a file; give a folder for the optimised model")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StepsaverError(f"cannot create {folder}: {exc.strerror or exc}; choose another --out") from None
    if model is not None and model in EMBEDDED_MODELS:
        base = {"kind": "embedded", "name": model, "fingerprint": weights_fingerprint(model)}
    elif model is not None and Path(model).is_dir():
        base = {"kind": "folder", "path": str(Path(model).resolve()), "fingerprint": weights_fingerprint(model)}
    else:
        pipe.save_pretrained(folder / "base")
        base = {"kind": "saved", "path": "base", "fingerprint": weights_fingerprint(folder / "base")}
    payload = {**result.to_dict(), "base": base}
    write_atomically(folder / "optimize.json", lambda tmp: tmp.write_text(dumps(payload, indent=2) + "\n"))
    return folder / "optimize.json"


def read_optimized(folder: str | os.PathLike) -> dict[str, Any]:
    """The checked ``optimize.json`` of an optimised folder (one-line errors for anything else)."""
    from stepsaver.files import read_json

    path = Path(folder)
    data = read_json(path / "optimize.json", what="optimised model",
                     missing_hint="; make one with `stepsaver optimize --model M --out DIR`")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StepsaverError(f"{path / 'optimize.json'} is not a {FORMAT} file; re-run `stepsaver optimize`")
    for key in ("chosen", "params", "machine", "base"):
        if key not in data:
            raise StepsaverError(f"{path / 'optimize.json'} lacks {key!r}; re-run `stepsaver optimize`")
    return data


def load_optimized(folder: str | os.PathLike, scheduler: str | None = None) -> Any:
    """The base pipeline of an optimised folder, on the CPU in float32, with its chosen levers re-applied.

    Refuses (one-line :class:`StepsaverError`) a folder made under another torch version or on a
    CPU with other flags, and a base model whose weights changed since. Honest about what it is:
    nothing compiled or exported was stored, so the levers are applied again here and the first
    call rebuilds their graphs (``pipe.stepsaver_optimized`` holds the record).
    """
    from stepsaver.pipelines import load_pipeline, weights_fingerprint

    path = Path(folder)
    data = read_optimized(path)
    check_machine(data["machine"], where=f"optimised folder {path}")
    base = data["base"]
    source = {"embedded": base.get("name"), "folder": base.get("path")}.get(base.get("kind"),
                                                                               str(path / str(base.get("path"))))
    if source is None:
        raise StepsaverError(f"{path / 'optimize.json'} names no base model; re-run `stepsaver optimize`")
    found = weights_fingerprint(source)
    if base.get("fingerprint") and found != base["fingerprint"]:
        raise StepsaverError(f"the base model {source} changed since it was optimised (weights {found} != "
                             f"{base['fingerprint']}); re-run `stepsaver optimize`")
    pipe = load_pipeline(source, scheduler=scheduler, device="cpu", dtype=torch.float32)
    apply_levers(pipe, data["chosen"], data["params"], data.get("vae"))
    pipe.stepsaver_optimized = {"folder": str(path), "levers": list(data["chosen"]),
                                "speedup": data.get("chosen_speedup")}
    return pipe


def load_model(name_or_path: str | os.PathLike, scheduler: str | None = None, device: str | None = "auto",
               dtype: str | None = "auto") -> Any:
    """:func:`stepsaver.load_pipeline`, plus the folders ``stepsaver optimize`` writes.

    Why here and not in ``load_pipeline``: the core imports no verb, and an optimised folder's
    loader re-applies Shrink's levers. This is the door ``generate``, ``samples``, ``calibrate``
    and ``serve`` open a ``--model`` with, so an optimised folder is served the same way a
    diffusers folder is. Its levers were chosen and timed on this CPU in float32, so another
    device or dtype is refused with the reason rather than silently ignored.
    """
    from stepsaver.pipelines import OPTIMIZED_MARKER, load_pipeline

    path = Path(str(name_or_path))
    if path.is_dir() and (path / OPTIMIZED_MARKER).is_file() and not (path / "model_index.json").is_file():
        if device not in (None, "auto", "cpu"):
            raise StepsaverError(f"{path} is an optimised folder: its levers were chosen on this CPU and run there; "
                                 f"drop --device {device} (or pass the base model to run it on {device})")
        if dtype not in (None, "auto", "float32", torch.float32):
            raise StepsaverError(f"{path} is an optimised folder: it runs in float32 with its own levers (bf16 or "
                                 f"int8 among them when they were kept); drop the dtype {dtype}")
        return load_optimized(path, scheduler=scheduler)
    return load_pipeline(name_or_path, scheduler=scheduler, device=device, dtype=dtype)


def summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per lever (and the combination) for a table: latency in ms, speedup, quality, verdict."""
    rows = []
    for r in [*result["levers"], *([result["combination"]] if result.get("combination") else [])]:
        name = r.get("lever") or "+".join(r.get("levers", []))
        rows.append({"lever": name, "status": r.get("status"),
                     "latency_ms": round(r["latency_s"] * 1000, 2) if r.get("latency_s") is not None else None,
                     "eager_ms": round(r["eager_s"] * 1000, 2) if r.get("eager_s") is not None else None,
                     "speedup": r.get("speedup"), "psnr_min": r.get("psnr_min"), "lpips_max": r.get("lpips_max"),
                     "reason": r.get("reason")})
    return rows

