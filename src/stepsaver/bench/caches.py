"""``stepsaver bench caches``: Skip beside diffusers' own caches on one Flux-layout model, in one run.

Issue 19. Every method renders the same held-out scene captions with the same noise (prompt ``i``
gets seed ``seed + i``), batch 1 (block caches decide per batch, so batching would change what
they do), and is compared with the full-step images of the same scheduler, at each step count:

* **full**: every step; **plain N**: fewer plain steps (a curve), and **iso-cost** plain steps at
  each of our rows' denoiser calls: the baseline every method must beat;
* **ours**: the Skip hook (:func:`stepsaver.skip.enable_adaptive_skip`), a threshold sweep;
* **fixed interval k**: the same hook with ``rule="fixed"``, one call every ``k`` steps after the
  warm-up: the non-adaptive baseline the criterion must beat at equal speed;
* **ours, drift rule**: the same hook with ``rule="drift"`` (reuse while the measured error of
  reusing stays under the threshold), a threshold sweep; judged like ours, in its own verdicts;
* diffusers' caches through ``pipe.transformer.enable_cache``: **FirstBlockCache** (threshold
  sweep), **MagCache** (its ``mag_ratios`` measured by its own ``calibrate`` mode on calibration
  prompts from the *training* split, disjoint from the eval captions), **TaylorSeer** (cache
  interval x order), **PyramidAttentionBroadcast** and **FasterCache** (diffusers' documented
  settings for Flux, the step read from ``pipe.current_timestep``).

No knob is chosen on the eval prompts: every swept setting is a point on its method's curve, and
MagCache's ratios come from the calibration prompts. Columns: denoiser calls (a block cache calls
the transformer every step and saves inside it, which shows in MACs), MACs per image
(``FlopCounterMode``), peak memory, median latency (round robin over ``time_n`` prompts),
speedup (full median / method median), PSNR, LPIPS, FID against the full-step images, and
adherence (the shipped scene reader).

**The UNet half** (``unet_model``, default the embedded ``tiny``): the same held-out prompts and
noise on the UNet model, with the methods that run on a ``UNet2DConditionModel``: plain fewer
steps, ours, fixed interval, DeepCache (PyPI ``DeepCache``, cache intervals) and PAB (diffusers'
``apply_pyramid_attention_broadcast`` on its attention modules; no other diffusers cache attaches
to a UNet). Its rows carry ``model`` = the UNet's name and get their own verdicts and Pareto panels.

**Renders are kept** under ``work`` (one ``.npz`` per prompt in a folder per model weights,
method and settings, written atomically): a run killed half-way resumes where it stopped, and
only the timing pass renders again. A report run locks its model (a second one is refused);
``--render-only`` runs lock one render folder at a time, so two can fill one model together.
**Results are kept in a ledger** (``ledger``, default beside the renders): each row's denoiser
calls per prompt and its scores, and MagCache's ratios, keyed by the render folders' names (which
hash everything that decides the images). A row found there is not rendered again, so the ledger
(small JSON, a few hundred KB) is what a long run commits to carry on in a later session on a
fresh machine whose renders are gone: only the timing pass then calls the pipeline, and a row
still missing re-renders its full-step reference first.

**Timing is kept per block** (one model at one step count, every method interleaved on the same
prompts in one process): speedups are ratios of medians within a block, so a block's timing is
valid on its own and is kept in the ledger under its methods, prompts, threads and machine; a
block with a new method, another thread count or another machine is timed again, and
``retime`` redoes it. Each row says when its block was timed (``timed_at``).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stepsaver.caches import CACHE_KINDS, CacheSpec, cache_kinds_for, deepcache_applied, unet_of
from stepsaver.errors import StepsaverError
from stepsaver.jsonsafe import finite

__all__ = ["CacheMethod", "CachesBenchConfig", "bench_caches", "calibrate_magcache", "cache_verdicts", "equal_calls"]

SPEEDUP_RANGE = (1.5, 3.0)  # issue 19's target band
DIFFUSERS_CACHES = tuple(CACHE_KINDS)
NAMES = {"full": "full", "plain": "plain", "iso": "iso-cost", "ours": "ours", "drift": "ours, drift rule",
         "fixed": "fixed interval",
         "deepcache": "DeepCache", **CACHE_KINDS}
# The methods ours must beat at equal or greater speedup: every cache, and our own hook with a fixed
# interval instead of the criterion (the non-adaptive baseline at the same reuse machinery).
RIVALS = (*DIFFUSERS_CACHES, "deepcache", "fixed")
OURS = ("ours", "drift")  # our hook's adaptive rules: the default criterion, and the drift rule
SKIP_KINDS = (*OURS, "fixed")  # rows made by our hook
# Skip's defaults when the render folders of those rows were first keyed (see implicit_skip_settings)
KEYED_SKIP_DEFAULTS = {"threshold": 0.02, "max_skips": 4, "warmup": 4, "per_sample": True, "compat": False,
                       "scale": "sigma", "reuse": "noise", "rule": "criterion"}
COLUMNS = ["model", "steps", "method", "denoiser_calls", "gmacs_per_image", "peak_memory_mb", "median_latency_ms",
           "speedup", "psnr_db", "lpips", "fid", "adherence"]


@dataclass(frozen=True)
class CacheMethod:
    """One way to render at ``steps``: plain steps, our hook, or one diffusers cache with its knobs."""

    kind: str  # "full" | "plain" | "iso" | "ours" | "drift" | "fixed" | "deepcache" | one of DIFFUSERS_CACHES
    steps: int
    knobs: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        knobs = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.knobs)
        return f"{NAMES[self.kind]}" + (f" ({knobs})" if knobs else "")

    @property
    def render_steps(self) -> int:
        return dict(self.knobs).get("steps", self.steps)

    def skip_config(self) -> Any:
        """Our hook's :class:`~stepsaver.skip.AdaptiveSkipConfig` for this row (kinds ours, drift, fixed)."""
        from stepsaver.skip import AdaptiveSkipConfig

        knobs = dict(self.knobs)
        # reuse pinned to what the ledger's renders were made with (Skip's default became "auto", which is
        # "noise" on every scheduler this benchmark runs), so a changed default never re-keys them
        if self.kind == "ours":  # the criterion (pinned: drift has its own rows), C_max its default
            return AdaptiveSkipConfig(threshold=knobs["threshold"], rule="criterion", reuse="noise")
        if self.kind == "drift":
            return AdaptiveSkipConfig(rule="drift", threshold=knobs["threshold"], max_skips=knobs["max_skips"],
                                      reuse="noise")
        return AdaptiveSkipConfig(rule="fixed", max_skips=knobs["interval"] - 1, reuse="noise")

    def implicit_skip_settings(self) -> dict[str, Any]:
        """The hook settings this row takes from Skip's defaults rather than its knobs, where they differ
        from the defaults its renders were first keyed under (:data:`KEYED_SKIP_DEFAULTS`).

        Why: the knobs name only what a row sweeps, so a changed default (another C_max, scale or
        reuse) would otherwise reuse renders made under the old one. Empty while the defaults are
        unchanged, so the renders already on disk keep their folders.
        """
        if self.kind not in SKIP_KINDS:
            return {}
        swept = {"ours": {"threshold"}, "drift": {"threshold", "max_skips"},
                 "fixed": {"threshold", "max_skips"}}[self.kind] | {"rule"}
        return {k: v for k, v in dataclasses.asdict(self.skip_config()).items()
                if k not in swept and v != KEYED_SKIP_DEFAULTS[k]}

    def diffusers_config(self, pipe: Any, mag_ratios: Sequence[float] | None = None) -> Any:
        """The diffusers cache config of this method (``None`` for plain steps and ours)."""
        if self.kind not in DIFFUSERS_CACHES:
            return None
        return CacheSpec(self.kind, self.knobs).diffusers_config(pipe, self.steps, mag_ratios)

    @contextlib.contextmanager
    def applied(self, pipe: Any, mag_ratios: Sequence[float] | None = None) -> Iterator[None]:
        """Attach the method for the block and take it off again, whatever happens inside."""
        if self.kind in SKIP_KINDS:
            from stepsaver.skip import disable_adaptive_skip, enable_adaptive_skip

            enable_adaptive_skip(pipe, self.skip_config())
            try:
                yield
            finally:
                disable_adaptive_skip(pipe)
        elif self.kind == "deepcache":
            with deepcache_applied(pipe, dict(self.knobs)["interval"]):
                yield
        elif self.kind in DIFFUSERS_CACHES:
            with CacheSpec(self.kind, self.knobs).applied(pipe, self.steps, mag_ratios):
                yield
        else:
            yield


@dataclass
class CachesBenchConfig:
    """What ``bench_caches`` runs; the CLI exposes each field as an option."""

    model: str | None = "tiny-flux"  # the Flux half (None: the UNet half only)
    unet_model: str | None = "tiny"  # the UNet half (None: Flux only)
    unet_n: int | None = None  # prompts of the UNet half (None: n)
    n: int = 200
    calib_n: int = 16  # MagCache calibration prompts (training split)
    time_n: int = 20
    macs_n: int = 1
    steps: tuple[int, ...] = (28, 50)
    guidance: float = 4.0
    seed: int = 0
    prompt_seed: int = 0
    ours_thresholds: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1)
    drift_thresholds: tuple[float, ...] = (0.06, 0.1, 0.15)  # rule="drift" (relative reuse error)
    drift_max_skips: int = 6
    fbc_thresholds: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2)
    magcache_thresholds: tuple[float, ...] = (0.03, 0.06, 0.12)
    taylorseer: tuple[tuple[int, int], ...] = ((2, 1), (3, 1), (3, 2), (5, 1))
    pab_skips: tuple[int, ...] = (2, 3)
    fastercache_skips: tuple[int, ...] = (2,)
    deepcache_intervals: tuple[int, ...] = (2, 3, 5)
    fixed_intervals: tuple[int, ...] = (2, 3, 5)  # our hook, one call every k steps after the warm-up
    plain_fractions: tuple[float, ...] = (0.25, 0.4, 0.6)
    fid: bool = True
    adherence: bool = True
    device: str = "auto"
    threads: int | None = None
    height: int | None = None  # None: the model's own size
    work: str | None = "runs/caches-bench"  # render cache (None: keep no image)
    ledger: str | None = None  # per-row calls and scores, MagCache's ratios (None: beside the renders in work)
    retime: bool = False  # time every block again instead of taking the ledger's timing
    render_only: bool = False  # fill the render cache and stop: no timing, scores or report
    score_only: bool = False  # fill the render and score caches and stop: no timing or report
    extra_call_kwargs: dict[str, Any] = field(default_factory=dict)

    def call_kwargs(self) -> dict[str, Any]:
        """What every render passes to the pipeline besides prompt, steps, seed and guidance."""
        return {**self.extra_call_kwargs, **({"height": self.height, "width": self.height} if self.height else {})}

    def validate(self) -> None:
        if self.model is None and self.unet_model is None:
            raise StepsaverError("bench caches needs a model: --model (Flux half) or --unet-model (UNet half)")
        if self.render_only and self.score_only:
            raise StepsaverError("--render-only and --score-only are two stages; pick one")
        if self.score_only and not self.work:
            raise StepsaverError("--score-only fills the score cache: give --work")
        if self.render_only and not self.work:
            raise StepsaverError("--render-only fills the render cache: give --work")
        for name in ("n", "unet_n"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise StepsaverError(f"--{name.replace('_', '-')} must be >= 2 (FID needs two images per set), "
                                     f"got {value}")
        for name in ("calib_n", "time_n", "macs_n"):
            value = getattr(self, name)
            if not 1 <= value <= (self.n if name != "calib_n" else 10_000):
                raise StepsaverError(f"--{name.replace('_', '-')} must be in 1..{self.n}, got {value}")
        if not self.steps or any(s < 5 for s in self.steps):
            raise StepsaverError(f"--steps must be step counts >= 5, got {self.steps}")
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise StepsaverError(f"--guidance must be a finite number >= 0, got {self.guidance}")
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 2 for k in self.fixed_intervals):
            raise StepsaverError(f"fixed intervals must be integers >= 2 (one call every k steps), "
                                 f"got {self.fixed_intervals}")
        if any(not 0 < f < 1 for f in self.plain_fractions):
            raise StepsaverError(f"plain fractions must be in (0, 1), got {self.plain_fractions}")

    def methods(self, steps: int, kinds: Sequence[str] = (*DIFFUSERS_CACHES,)) -> list[CacheMethod]:
        """Every row at ``steps`` except the iso-cost ones (known after ours ran), for the caches in
        ``kinds`` (what the model runs: every diffusers cache on Flux; PAB and DeepCache on a UNet)."""
        rows = [CacheMethod("full", steps)]
        rows += [CacheMethod("plain", steps, (("steps", max(2, round(steps * f))),)) for f in self.plain_fractions]
        rows += [CacheMethod("ours", steps, (("threshold", t),)) for t in self.ours_thresholds]
        rows += [CacheMethod("drift", steps, (("threshold", t), ("max_skips", self.drift_max_skips)))
                 for t in self.drift_thresholds]
        rows += [CacheMethod("fixed", steps, (("interval", k),)) for k in self.fixed_intervals]
        sweeps = {"fbc": [(("threshold", t),) for t in self.fbc_thresholds],
                  "magcache": [(("threshold", t),) for t in self.magcache_thresholds],
                  "taylorseer": [(("interval", i), ("order", o)) for i, o in self.taylorseer],
                  "pab": [(("skip", k),) for k in self.pab_skips],
                  "fastercache": [(("skip", k),) for k in self.fastercache_skips],
                  "deepcache": [(("interval", k),) for k in self.deepcache_intervals]}
        rows += [CacheMethod(kind, steps, knobs) for kind in sweeps if kind in kinds for knobs in sweeps[kind]]
        return rows


def refuse_unsupported(pipe: Any, kinds: Sequence[str]) -> None:
    """One clear error when a diffusers cache cannot attach to this model (not a ``CacheMixin``)."""
    needs = sorted({NAMES[k] for k in kinds if k in DIFFUSERS_CACHES})
    denoiser = getattr(pipe, "transformer", None)
    if needs and not callable(getattr(denoiser, "enable_cache", None)):
        raise StepsaverError(
            f"{', '.join(needs)} attach through diffusers' CacheMixin.enable_cache, which "
            f"{type(getattr(pipe, 'transformer', None) or getattr(pipe, 'unet', None)).__name__} does not have; "
            "bench caches needs a Flux-layout model such as tiny-flux (--model tiny-flux)")


def calibrate_magcache(pipe: Any, prompts: Sequence[str], steps: int, seeds: Sequence[int], guidance: float,
                       **call_kwargs: Any) -> list[float]:
    """MagCache's per-step magnitude ratios from its own ``calibrate`` mode, averaged over ``prompts``.

    diffusers prints the ratios of each run (one list per cache context: Flux's true CFG runs a
    "cond" and an "uncond" context) when the run ends; they are read from that output.
    """
    import diffusers

    from stepsaver.generation import generate_images

    runs: list[list[float]] = []
    pipe.transformer.enable_cache(diffusers.MagCacheConfig(calibrate=True, num_inference_steps=steps))
    try:
        for prompt, seed in zip(prompts, seeds, strict=True):
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                generate_images(pipe, [prompt], steps=steps, seeds=[seed], guidance=guidance, output_type="latent",
                                **call_kwargs)
            for line in buffer.getvalue().splitlines():
                text = line.strip()
                if not (text.startswith("[") and text.endswith("]")):
                    continue  # the "[MagCache] Calibration Complete..." heading
                try:
                    values = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    continue
                if isinstance(values, list) and len(values) == steps:
                    runs.append([float(v) for v in values])
    finally:
        pipe.transformer.disable_cache()
    if not runs:
        raise StepsaverError("MagCache's calibration printed no ratios; this diffusers version reports them "
                             "differently (expected a list per run on stdout)")
    ratios = np.mean(np.array(runs), axis=0)
    if not np.isfinite(ratios).all():
        raise StepsaverError("MagCache's calibration gave non-finite ratios (the model's residuals vanish)")
    return [float(v) for v in ratios]


def _magcache_ratios(ledger: Path | None, label: str, pipe: Any, prompts: Sequence[str], steps: int,
                     cfg: CachesBenchConfig) -> list[float]:
    """MagCache's calibrated ratios at ``steps``, kept in ``<ledger>/<label>/magcache.json``.

    Why kept: the ratios enter the MagCache rows' render keys, and recomputing them in another
    process (another thread count sums in another order) can move the last digit and orphan
    every MagCache render; it also saves the calibration minute of every resumed run. Keyed by
    the denoiser's fingerprint and everything the calibration depends on. A ledger kept apart from
    the renders takes the ratios the renders were made with when it lacks them.
    """
    def compute() -> list[float]:
        return calibrate_magcache(pipe, prompts, steps, list(range(len(prompts))), cfg.guidance, **cfg.call_kwargs())

    if ledger is None:
        return compute()
    from stepsaver.calibrate.config import pipeline_fingerprint
    from stepsaver.files import json_lookup, json_memo

    key = json.dumps({"weights": pipeline_fingerprint(pipe), "steps": steps, "prompts": list(prompts),
                      "guidance": cfg.guidance, "call": repr(sorted(cfg.call_kwargs().items()))}, sort_keys=True)
    beside = Path(cfg.work) / label / "magcache.json" if cfg.work else None
    known = lambda: json_lookup(beside, key) if beside else None  # noqa: E731
    return [float(v) for v in json_memo(ledger / label / "magcache.json", key, lambda: known() or compute())]


def _render(pipe: Any, method: CacheMethod, prompt: str, seed: int, cfg: CachesBenchConfig,
            mag: dict[int, list[float]]) -> tuple[np.ndarray, int, float]:
    from stepsaver.generation import generate_images

    with method.applied(pipe, mag.get(method.steps)):
        r = generate_images(pipe, [prompt], steps=method.render_steps, seeds=[seed], guidance=cfg.guidance,
                            output_type="np", **cfg.call_kwargs())[0]
    image = (np.asarray(r.images[0]) * 255).round().clip(0, 255).astype(np.uint8)
    return image, r.denoiser_calls, r.seconds


class _Renders:
    """One model's renders on disk: ``root/<model>-<kind>-<steps>-<key digest>/<index>.npz``.

    The key hashes everything that decides an image (the model's weights fingerprint, the method
    and its knobs, MagCache's ratios, guidance, seeds, call arguments), and each file keeps its
    prompt, so a retrained model or a changed scene vocabulary never reuses a stale image. Files
    are written atomically (a temporary name, then ``os.replace``); a torn file is rendered again.
    """

    def __init__(self, root: Path | None, pipe: Any, label: str, cfg: CachesBenchConfig,
                 ledger: Path | None = None) -> None:
        self.root = root
        self.ledger = ledger if ledger is not None else root
        self.base: dict[str, Any] = {}
        if self.ledger is not None:
            from stepsaver.calibrate.config import pipeline_fingerprint, quick_weights_digest

            # The VAE decides the images too, and the denoiser's fingerprint does not cover it.
            weights = pipeline_fingerprint(pipe) + "-" + quick_weights_digest(getattr(pipe, "vae", None))[:12]
            self.base = {"model": label, "weights": weights, "guidance": cfg.guidance,
                         "seed": cfg.seed, "prompt_seed": cfg.prompt_seed,
                         "call": repr(sorted(cfg.call_kwargs().items()))}

    def _name(self, method: CacheMethod, mag: Sequence[float] | None) -> str:
        implicit = method.implicit_skip_settings()
        key = json.dumps({**self.base, "kind": method.kind, "steps": method.steps, "knobs": method.knobs,
                          "mag": [round(v, 6) for v in mag] if method.kind == "magcache" and mag else None,
                          **({"skip": implicit} if implicit else {})}, sort_keys=True, default=str)
        return f"{self.base['model']}-{method.kind}-{method.steps}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"

    def _file(self, method: CacheMethod, mag: Sequence[float] | None, i: int) -> Path:
        assert self.root is not None
        return self.root / self._name(method, mag) / f"{i:05d}.npz"

    def get(self, method: CacheMethod, mag: Sequence[float] | None, i: int,
            prompt: str) -> tuple[np.ndarray, int] | None:
        if self.root is None:
            return None
        try:
            with np.load(self._file(method, mag, i)) as z:
                if str(z["prompt"]) != prompt:
                    return None
                return z["image"].copy(), int(z["calls"])
        except (OSError, ValueError, KeyError):  # missing, torn or foreign: render again
            return None

    def folder(self, method: CacheMethod, mag: Sequence[float] | None) -> str | None:
        """The name of the method's render folder (``None`` with neither work folder nor ledger)."""
        return None if self.ledger is None else self._name(method, mag)

    def _ledger_file(self, name: str) -> Path:
        assert self.ledger is not None
        return self.ledger / self.base["model"] / name

    def known(self, key: str) -> dict[str, Any] | None:
        """The row's ledger entry (calls per prompt and scores) when complete, else ``None``."""
        if self.ledger is None:
            return None
        from stepsaver.files import json_lookup

        entry = json_lookup(self._ledger_file("scores.json"), key)
        return entry if isinstance(entry, dict) and isinstance(entry.get("calls"), list) else None

    def timing(self, key: str, compute: Callable[[], dict[str, Any]], replace: bool) -> dict[str, Any]:
        """A block's timing (seconds per method and prompt, peak memory), measured once per ``key``."""
        if self.ledger is None:
            return compute()
        from stepsaver.files import json_memo

        return json_memo(self._ledger_file("timing.json"), key, compute, replace=replace)

    def scores(self, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """A row's calls per prompt and quality scores (PSNR, LPIPS, FID, adherence, MACs), once per ``key``.

        Why: scoring every row (Inception features for FID, the adherence detector) takes as long as
        a block of renders, and a resumed or extended run (another step count, a new sweep point)
        would redo it for rows whose images have not changed. ``key`` names both render folders
        (the row's and its full-step reference, which hash everything that decides the images)
        and the scoring settings, so a changed image or setting is scored again. Timing is kept
        apart, per block (:meth:`timing`): speedups are ratios of medians within one block. FID's runtime (ONNX
        Runtime or TorchScript, features equal to 1e-4) is not part of the key. The file is merged
        and replaced atomically, so two processes can add rows to one ledger.
        """
        if self.ledger is None:
            return compute()
        from stepsaver.files import json_memo

        return json_memo(self._ledger_file("scores.json"), key, compute)

    @contextlib.contextmanager
    def lock(self, method: CacheMethod, mag: Sequence[float] | None, wait: bool) -> Iterator[bool]:
        """Hold the method's render folder for the block (``True``), or yield ``False`` at once when
        another process holds it and ``wait`` is off. No work folder: nothing to share, ``True``."""
        if self.root is None:
            yield True
            return
        from stepsaver.files import exclusive_folder

        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(exclusive_folder(self._file(method, mag, 0).parent, "bench caches renderer",
                                                     wait=wait))
                held = True
            except StepsaverError:
                held = False
            yield held

    def put(self, method: CacheMethod, mag: Sequence[float] | None, i: int, prompt: str, image: np.ndarray,
            calls: int) -> None:
        if self.root is None:
            return
        path = self._file(method, mag, i)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
        np.savez(tmp, image=image, calls=calls, prompt=prompt)
        os.replace(tmp, path)


def cache_verdicts(rows: Sequence[dict]) -> dict[str, Any]:
    """Issue 19's targets from the rows, per model and step count.

    In the speedup band 1.5x-3x, each of our rows must have higher PSNR and lower LPIPS than every
    rival row (diffusers' caches; DeepCache on the UNet; our fixed interval) at equal or greater speedup, and
    beat its iso-cost plain-steps row. Keys are ``steps_N`` for the first model (the Flux one) and
    ``<model>_steps_N`` for any other.
    """
    out: dict[str, Any] = {}
    models = list(dict.fromkeys(r.get("model", "") for r in rows))
    for model in models:
        for steps in sorted({r["steps"] for r in rows if r.get("model", "") == model}):
            at = [r for r in rows if r["steps"] == steps and r.get("model", "") == model]
            where = f"{model + ', ' if len(models) > 1 else ''}{steps} steps"
            key = f"steps_{steps}" if model == models[0] else f"{model}_steps_{steps}"
            out[key] = _verdict(at, where)
            if any(r["kind"] == "drift" for r in at):
                out[f"{key}_drift"] = _verdict(at, f"{where}, drift rule", "drift")
    return out


def _interpolate(curve: Sequence[dict], calls: float, key: str) -> float | None:
    """``key`` of a piecewise-linear curve (rows sorted by denoiser calls) at ``calls``; ``None`` outside it.

    An end of the curve within 2% of ``calls`` counts as equal calls (15.97 mean calls vs a fixed
    interval's 16 is the same cost), so such a row is compared with that end, never extrapolated.
    """
    points = [(r["denoiser_calls"], r[key]) for r in curve if r.get(key) is not None]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= calls <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (calls - x0) / (x1 - x0)
    near = [y for x, y in (points[:1] + points[-1:]) if abs(x - calls) <= 0.02 * x]
    return near[0] if near else None


def equal_calls(rows: Sequence[dict]) -> list[dict[str, Any]]:
    """Each adaptive row of our hook beside the two non-adaptive curves at its own denoiser calls.

    Why: speedups are noisy and a rival's curve rarely has a point at our speed, so the verdicts
    compare with whatever row happens to be faster. At equal calls the question is exact: does
    the rule choose *which* steps to reuse better than a timer (fixed interval, the same hook and
    reuse) and better than simply running fewer steps (plain steps, the iso-cost rows included)?
    Both curves are interpolated linearly in calls between their measured rows; outside a curve's
    range the cell is empty.
    """
    out = []
    for model in dict.fromkeys(r.get("model", "") for r in rows):
        for steps in sorted({r["steps"] for r in rows if r.get("model", "") == model}):
            at = [r for r in rows if r["steps"] == steps and r.get("model", "") == model]
            fixed = sorted((r for r in at if r["kind"] == "fixed"), key=lambda r: r["denoiser_calls"])
            plain = sorted((r for r in at if r["kind"] in ("plain", "iso")), key=lambda r: r["denoiser_calls"])
            for o in (r for r in at if r["kind"] in OURS):
                row: dict[str, Any] = {"model": model, "steps": steps, "method": o["method"],
                                       "denoiser_calls": o["denoiser_calls"], "psnr_db": o["psnr_db"],
                                       "lpips": o["lpips"]}
                for name, curve in (("fixed", fixed), ("plain", plain)):
                    psnr = _interpolate(curve, o["denoiser_calls"], "psnr_db")
                    lpips = _interpolate(curve, o["denoiser_calls"], "lpips")
                    row[f"{name}_psnr_db"], row[f"{name}_lpips"] = psnr, lpips
                    row[f"vs_{name}"] = ("n/a" if psnr is None or lpips is None else
                                         "better" if o["psnr_db"] > psnr and o["lpips"] < lpips else
                                         "worse" if o["psnr_db"] < psnr and o["lpips"] > lpips else "mixed")
                out.append(row)
    return out


EQUAL_CALLS_COLUMNS = ["model", "steps", "method", "denoiser_calls", "psnr_db", "fixed_psnr_db", "plain_psnr_db",
                       "lpips", "fixed_lpips", "plain_lpips", "vs_fixed", "vs_plain"]


def _verdict(at: Sequence[dict], where: str, kind: str = "ours") -> dict[str, Any]:
    ours = [r for r in at if r["kind"] == kind and SPEEDUP_RANGE[0] <= r["speedup"] <= SPEEDUP_RANGE[1]]
    caches = [r for r in at if r["kind"] in RIVALS]
    losses, iso_losses = [], []
    for o in ours:
        for c in caches:
            if c["speedup"] >= o["speedup"] and not (o["psnr_db"] > c["psnr_db"] and o["lpips"] < c["lpips"]):
                losses.append(f"{o['method']} {o['speedup']:.2f}x {o['psnr_db']:.1f} dB vs {c['method']} "
                              f"{c['speedup']:.2f}x {c['psnr_db']:.1f} dB")
        iso = next((r for r in at if r["kind"] == "iso" and o["method"] in r["iso_of"]), None)
        if iso is not None and not (o["psnr_db"] > iso["psnr_db"] and o["lpips"] < iso["lpips"]):
            iso_losses.append(f"{o['method']} vs {iso['method']}")
    holds = bool(ours) and not losses and not iso_losses
    text = (f"**{where}: {'holds' if holds else 'does not hold'}** — {len(ours)} of our settings in the "
            f"{SPEEDUP_RANGE[0]:g}x-{SPEEDUP_RANGE[1]:g}x band"
            + (f"; beaten or tied by a rival at equal or greater speedup: {'; '.join(losses)}" if losses else "")
            + (f"; not better than plain steps at the same calls: {'; '.join(iso_losses)}" if iso_losses else "")
            + ".")
    if not ours:
        text = f"**{where}: not evaluated** — none of our settings landed in the speedup band."
    return {"holds": holds if ours else None, "losses": losses, "iso_losses": iso_losses, "text": text}


def _pareto_plot(out: Path, rows: Sequence[dict]) -> Path:
    """PSNR vs speedup, one curve per method: a row of panels per model, a column per step count."""
    from stepsaver.measure.report import pyplot, save_plot

    plt = pyplot()
    models = list(dict.fromkeys(r.get("model", "") for r in rows))
    steps = sorted({r["steps"] for r in rows})
    fig, axes = plt.subplots(len(models), len(steps), figsize=(5.6 * len(steps), 4.4 * len(models)), dpi=120,
                             squeeze=False)
    for axrow, model in zip(axes, models, strict=True):
        for ax, n in zip(axrow, steps, strict=True):
            for kind in ("plain", *OURS, *RIVALS):
                pts = sorted((r["speedup"], r["psnr_db"]) for r in rows if r["steps"] == n and r["kind"] == kind
                             and r.get("model", "") == model and r["psnr_db"] is not None)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o" if kind in OURS else ".", ms=5,
                            lw=2.0 if kind in OURS else 1.0, label=NAMES[kind])
            ax.axvspan(*SPEEDUP_RANGE, color="grey", alpha=0.08)
            ax.set(xlabel="speedup vs full steps (median latency ratio)", ylabel="PSNR vs the full-step image (dB)")
            ax.set_title(f"{model} — {n} steps" if model else f"{n} steps", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return save_plot(fig, out / "caches.png")


def bench_caches(cfg: CachesBenchConfig | None = None, out_dir: str | Path = "docs/results", pipe: Any = None,
                 progress: bool = True, unet_pipe: Any = None) -> dict[str, Any]:
    """Run the comparison, write caches.{json,md,png} under ``out_dir``, return rows and verdicts.

    ``pipe`` / ``unet_pipe`` replace loading ``cfg.model`` / ``cfg.unet_model`` (tests pass tiny
    random pipelines).
    """
    import torch

    cfg = cfg or CachesBenchConfig()
    cfg.validate()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    try:
        rows, mag = _run(cfg, pipe, unet_pipe, progress)
    finally:
        torch.set_num_threads(threads)
    if cfg.render_only or cfg.score_only:
        return {"rows": [], "targets": {}, "seconds": time.perf_counter() - t0, "json": None, "md": None,
                "plots": []}
    verdicts = cache_verdicts(rows)
    matched = equal_calls(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot = _pareto_plot(out, rows)
    elapsed = time.perf_counter() - t0
    from stepsaver.measure.report import markdown_table, write_report
    from stepsaver.shrink.optimize import machine_info

    unet = (f" The UNet half ({cfg.unet_model}, its own scheduler) renders the first {cfg.unet_n or cfg.n} of the "
            "same prompts with the same noise and runs the methods a UNet takes: plain steps, ours, fixed "
            "interval, DeepCache and PAB.") if cfg.unet_model else ""
    flux = f"On {cfg.model}: " if cfg.model else "UNet half only: "
    summary = "\n".join([
        f"{flux}{cfg.n} held-out scene prompts (eval split), batch 1, seeds {cfg.seed}..{cfg.seed + cfg.n - 1}, "
        f"guidance {cfg.guidance:g} (true CFG on Flux); quality against the full-step images of the same scheduler. "
        f"MagCache ratios from its calibrate mode on {cfg.calib_n} training-split prompts.{unet} "
        f"Run took {elapsed / 60:.1f} min "
        "(rows and block timings found in the ledger are reused, so a resumed run's time is its remainder). "
        "Each block (a model at a step count) was timed in one process, every method in turn on the same prompts: "
        + "; ".join(f"{m} {st} steps at {t}" for (m, st), t in
                    dict.fromkeys(((r["model"], r["steps"]), r["timed_at"]) for r in rows).keys()) + ".", "",
        "## Targets", "", *(v["text"] for v in verdicts.values()), "",
        "## Our hook at equal calls", "",
        "Each adaptive row beside the fixed interval (the same hook on a timer) and plain steps, both "
        "interpolated linearly at its own denoiser calls; better = higher PSNR and lower LPIPS.", "",
        markdown_table(finite(matched), EQUAL_CALLS_COLUMNS), "",
        "Block-level caches (FirstBlockCache, MagCache, TaylorSeer, PAB, FasterCache) call the transformer every "
        "step and save work inside it, so their saving shows in MACs and latency, not in denoiser calls; ours "
        "skips whole calls. DeepCache also calls the UNet every step and reuses its deep features. "
        "Fixed interval is our hook without its criterion (one call every k steps after the warm-up): "
        "where it matches ours at equal speed, the criterion adds nothing on that model."])
    table = [{k: v for k, v in r.items() if k not in ("per_image",)} for r in rows]
    title = "Caches: Skip beside diffusers' caches on " + " and ".join(m for m in (cfg.model, cfg.unet_model) if m)
    paths = write_report("caches", finite(table), title=title,
                         summary=summary, extra=finite({"config": asdict(cfg) | {"extra_call_kwargs": None},
                                                        "targets": verdicts, "equal_calls": matched,
                                                        "magcache_ratios": mag,
                                                        "machine": machine_info(), "seconds": elapsed}),
                         plots=[plot], out_dir=out, columns=COLUMNS)
    return {"rows": table, "targets": verdicts, "seconds": elapsed, "json": str(paths["json"]),
            "md": str(paths["md"]), "plots": [str(plot)]}


def _run(cfg: CachesBenchConfig, pipe: Any, unet_pipe: Any, progress: bool) -> tuple[list[dict], dict]:
    """Both halves' rows (the Flux model, then the UNet one) and MagCache's ratios."""
    from stepsaver.bench.skip import _lpips, _psnr, peak_memory_bytes
    from stepsaver.files import exclusive_folder
    from stepsaver.measure.cost import count_macs
    from stepsaver.pipelines import load_pipeline
    from stepsaver.scenes import SceneGenerator

    if pipe is None and cfg.model:
        pipe = load_pipeline(cfg.model, scheduler=None, device=cfg.device)
    if pipe is not None:
        refuse_unsupported(pipe, [m.kind for m in cfg.methods(cfg.steps[0])])
    if cfg.unet_model and unet_pipe is None:
        unet_pipe = load_pipeline(cfg.unet_model, scheduler=None, device=cfg.device)
    if unet_pipe is not None and unet_of(unet_pipe) is None:
        raise StepsaverError(f"--unet-model {cfg.unet_model!r} has no UNet ({type(unet_pipe).__name__}); the UNet "
                             "half runs DeepCache and PAB, which need one (use the embedded 'tiny', or "
                             "--unet-model none)")
    gen = SceneGenerator(seed=cfg.prompt_seed, split="eval")
    scenes = [gen.sample(i) for i in range(max(cfg.n, cfg.unet_n or 0))]
    prompts = [s.caption for s in scenes]
    seeds = [cfg.seed + i for i in range(len(scenes))]
    calib = SceneGenerator(seed=cfg.prompt_seed + 1, split="train")
    calib_prompts = [calib.sample(i).caption for i in range(cfg.calib_n)]
    work = Path(cfg.work) if cfg.work else None
    ledger = Path(cfg.ledger) if cfg.ledger else work
    mag = {s: _magcache_ratios(ledger, cfg.model or "flux", pipe, calib_prompts, s, cfg)
           for s in cfg.steps} if cfg.magcache_thresholds and pipe is not None else {}
    scorer = None
    if cfg.adherence and not cfg.render_only:
        from stepsaver.measure.adherence import AdherenceScorer

        scorer = AdherenceScorer.load()
    tools = (_psnr, _lpips, peak_memory_bytes, count_macs)
    halves = [(cfg.model or "flux", pipe, cfg.n, tuple(DIFFUSERS_CACHES), mag)] if pipe is not None else []
    if unet_pipe is not None:
        halves.append((cfg.unet_model or "unet", unet_pipe, cfg.unet_n or cfg.n, cache_kinds_for(unet_pipe)
                       + ("deepcache",), {}))
    rows: list[dict] = []
    for label, p, n, kinds, ratios in halves:
        # A report run holds its model's lock (a second report on the same model is refused);
        # --render-only runs do not, and share a model through a lock per render folder, so two
        # processes (a core each) can fill one model's cache together.
        home = work or ledger
        hold = home is not None and not cfg.render_only
        with exclusive_folder(home / label, "bench caches") if hold else contextlib.nullcontext():
            renders = _Renders(work, p, label, cfg, ledger)
            for steps in cfg.steps:
                rows += _block(p, label, cfg, steps, kinds, prompts[:n], seeds[:n], scenes[:n], ratios, scorer,
                               progress, tools, renders)
    return rows, mag


def _block(pipe: Any, label: str, cfg: CachesBenchConfig, steps: int, kinds: Sequence[str], prompts: list[str],
           seeds: list[int], scenes: list, mag: dict[int, list[float]], scorer: Any, progress: bool, tools: tuple,
           renders: _Renders) -> list[dict]:
    """Every method at one step count on one model: renders, iso-cost rows, MACs, memory, timing, quality."""
    from rich.progress import Progress

    psnr, lpips, peak_memory_bytes, count_macs = tools
    methods = cfg.methods(steps, kinds)
    images: dict[CacheMethod, np.ndarray] = {}
    calls: dict[CacheMethod, list[int]] = {}
    time_n = min(cfg.time_n, len(prompts))

    def render_all(method: CacheMethod, bar: Any, wait: bool = True) -> bool:
        """Fill ``images``/``calls`` for the method, rendering what the cache lacks; ``False`` when
        another process holds the method's folder and ``wait`` is off."""
        with renders.lock(method, mag.get(method.steps), wait) as held:
            if not held:
                return False
            fill(method, bar)
        return True

    def fill(method: CacheMethod, bar: Any) -> None:
        ratios = mag.get(method.steps)
        task = bar.add_task(f"{label} {steps} steps: {method.label}", total=len(prompts)) if bar else None
        out = []
        for i, (p, s) in enumerate(zip(prompts, seeds, strict=True)):
            got = renders.get(method, ratios, i, p)
            if got is None:
                image, n_calls, _ = _render(pipe, method, p, s, cfg, mag)
                renders.put(method, ratios, i, p, image, n_calls)
                got = (image, n_calls)
            out.append(got)
            if bar:
                bar.advance(task)
        images[method] = np.stack([o[0] for o in out])
        calls[method] = [o[1] for o in out]

    def key_of(m: CacheMethod) -> str:
        ratios = mag.get(m.steps)
        return json.dumps({"images": renders.folder(m, ratios), "reference": renders.folder(full, ratios),
                           "n": len(prompts), "fid": cfg.fid, "adherence": scorer is not None,
                           "macs_n": cfg.macs_n}, sort_keys=True)

    full = methods[0]
    scores: dict[CacheMethod, dict[str, Any]] = {}

    def known(m: CacheMethod) -> bool:
        """Whether the ledger holds the row (its calls and scores): then it needs no render."""
        entry = renders.known(key_of(m))
        if entry is None or len(entry["calls"]) != len(prompts):
            return False
        scores[m], calls[m] = entry, [int(c) for c in entry["calls"]]
        return True

    from stepsaver.measure.fid import features, fid_from_features

    fid_ref: dict[str, Any] = {}  # the reference's Inception features, made when a row first needs them

    def score(m: CacheMethod) -> dict[str, Any]:
        same = m is full
        ref = images[full]
        macs = count_macs(lambda: [_render(pipe, m, prompts[i], seeds[i], cfg, mag)
                                   for i in range(cfg.macs_n)]) / cfg.macs_n
        out = {"gmacs_per_image": macs / 1e9, "calls": list(calls[m]),
               "psnr_db": None if same else float(np.mean(psnr(images[m], ref))),
               "lpips": float(np.mean(lpips(images[m], ref))), "fid": None, "adherence": None}
        if cfg.fid:
            if not same and "ref" not in fid_ref:
                fid_ref["ref"] = features(ref)
            out["fid"] = 0.0 if same else fid_from_features(fid_ref["ref"], features(images[m]))
        if scorer is not None:
            out["adherence"] = scorer.score(images[m], scenes).summary()["adherence"]
        return out

    with Progress(transient=False, disable=not progress) as bar:
        todo = [m for m in methods if not known(m)]
        if todo and full not in todo:
            todo.insert(0, full)  # the reference of every row still to score
        scored = bar.add_task(f"{label} {steps} steps: scores", total=len(todo), visible=not cfg.render_only)

        def finish(m: CacheMethod) -> None:
            """Score a rendered row at once (into the ledger), so a killed run loses no finished row."""
            if not cfg.render_only:
                scores[m] = renders.scores(key_of(m), lambda: score(m))
                bar.advance(scored)

        def run(m: CacheMethod, wait: bool) -> bool:
            done = render_all(m, bar, wait=wait)
            if done:
                finish(m)
            return done

        # Stage runs (--render-only, --score-only) first take what no other process is rendering,
        # then wait for the rest; a report run waits for each in turn.
        busy = [m for m in todo if not run(m, wait=not (cfg.render_only or cfg.score_only))]
        for method in busy:
            run(method, wait=True)
        per_step = np.mean(calls[full]) / steps  # calls a plain step makes (2 with true CFG)
        iso_of: dict[CacheMethod, list[str]] = {}
        for method in [m for m in methods if m.kind in OURS]:
            n_iso = max(2, min(steps, round(np.mean(calls[method]) / per_step)))
            iso = CacheMethod("iso", steps, (("steps", n_iso),))
            if iso not in calls:
                methods.append(iso)
                if not known(iso):
                    if full not in images:
                        render_all(full, bar)
                    bar.update(scored, total=len(todo) + 1)
                    todo.append(iso)
                    run(iso, wait=True)
            iso_of.setdefault(iso, []).append(method.label)
        if cfg.render_only:
            return []
        if cfg.score_only:
            return []
        name = {m: renders.folder(m, mag.get(m.steps)) or m.label for m in methods}

        def timed() -> dict[str, Any]:
            seconds: dict[CacheMethod, list[float]] = {m: [] for m in methods}
            for m in methods:  # one untimed call each (allocations, lazy imports)
                _render(pipe, m, prompts[0], seeds[0], cfg, mag)
            task = bar.add_task(f"{label} {steps} steps: timing", total=time_n)
            for i in range(time_n):
                for m in methods:
                    seconds[m].append(_render(pipe, m, prompts[i], seeds[i], cfg, mag)[2])
                bar.advance(task)
            peak = {name[m]: peak_memory_bytes(lambda m=m: _render(pipe, m, prompts[0], seeds[0], cfg, mag))
                    for m in methods}
            return {"seconds": {name[m]: v for m, v in seconds.items()}, "peak_bytes": peak,
                    "timed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

        from stepsaver.shrink.optimize import machine_info

        block = json.dumps({"methods": sorted(name.values()), "prompts": prompts[:time_n], "seeds": seeds[:time_n],
                            "device": cfg.device, "machine": machine_info()}, sort_keys=True)
        timing = renders.timing(block, timed, replace=cfg.retime)
    median = {m: statistics.median(timing["seconds"][name[m]]) for m in methods}
    rows = []
    for m in methods:
        rows.append({"model": label, "steps": steps, "method": m.label, "kind": m.kind, "knobs": dict(m.knobs),
                     "denoiser_calls": float(np.mean(calls[m])), "gmacs_per_image": scores[m]["gmacs_per_image"],
                     "peak_memory_mb": timing["peak_bytes"][name[m]] / 2**20, "median_latency_ms": median[m] * 1e3,
                     "speedup": median[full] / median[m], "psnr_db": scores[m]["psnr_db"],
                     "lpips": scores[m]["lpips"], "fid": scores[m]["fid"], "adherence": scores[m]["adherence"],
                     "iso_of": iso_of.get(m, []), "timed_at": timing["timed_at"]})
    return rows
