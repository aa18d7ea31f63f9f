"""``stepsaver bench skip``: AdaptiveDiffusion skipping against its baselines, in one run.

Every method renders the same held-out scene captions (``SceneGenerator(seed, split="eval")``)
with the same seeds (prompt ``i`` gets ``seed + i``) and is compared with the full-step images of
the same scheduler. Rows, per scheduler (DDIM, DPM++ 2M, Euler by default):

* **full**: ``steps`` plain steps, the reference;
* **ours**: the Skip hook as shipped (:class:`AdaptiveSkipConfig` defaults: the drift rule), batch 1;
* **criterion**: the hook with the third-order criterion at its own defaults (delta 0.02, C_max 4;
  the default until the drift rule replaced it), so the switch is measured in every run;
* **ours per-sample, batch B**: the same config on batches of ``B`` prompts, one path per sample;
* **official-compat**: the hook reproducing the official code's decisions (batch 1);
* **DeepCache k**: PyPI ``DeepCache``'s ``DeepCacheSDHelper``, cache interval ``k`` (2, 3, 5);
* **other thresholds**: the shipped rule at other thresholds (``drift_thresholds``);
* **fixed interval k**: the Skip hook with ``rule="fixed"``: one call every ``k`` steps after the
  warm-up, no criterion (2, 3, 5): the non-adaptive baseline at the same reuse machinery;
* **iso-cost fixed N**: plain ``N`` steps, ``N`` = ours' mean denoiser calls, rounded: the same
  budget spent on fewer steps instead of skipped ones.

Columns: denoiser calls per image (the pipeline's calls that ran the network; DeepCache runs it
every step, the full UNet only every k-th, which shows in MACs), MACs per image (torch's
``FlopCounterMode`` on the first ``macs_n`` prompts), peak memory (see :func:`peak_memory_bytes`),
median latency per image, speedup (ratio of the full row's median latency to the method's, both
from one round-robin timing pass so background load hits every method alike), PSNR, LPIPS
(AlexNet) and FID (TF-Inception) against the full-step images.

Ablations on the first ``ablation_n`` prompts, for the schedulers in ``ablation_schedulers``
(default: the first one, DDIM, where the issue's targets are; every other scheduler doubles the
run's cost): threshold x C_max of the shipped rule (with an iso-cost fixed-step
baseline for every cell, so "which setting beats fixed steps" is answered from the numbers) and
the step count (ours vs full at 50/25/15/10 steps). The greedy oracle (:mod:`stepsaver.skip.oracle`)
runs on the first ``oracle_n`` prompts of the first scheduler, next to the estimator's paths.

The markdown states whether each target of issue 4 holds, computed from the rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepsaver.errors import StepsaverError
from stepsaver.jsonsafe import finite
from stepsaver.skip.config import RULE_DEFAULTS, AdaptiveSkipConfig

__all__ = ["Method", "SkipBenchConfig", "bench_skip", "peak_memory_bytes", "targets"]

DEFAULT_SCHEDULERS = ("ddim", "dpmpp_2m", "euler")
DELTAS = (0.06, 0.1, 0.15)  # ablation grid: thresholds of the shipped rule (drift: relative reuse error)
MAX_SKIPS_GRID = (4, 6)
ABLATION_STEPS = (50, 25, 15, 10)
DEEPCACHE_INTERVALS = (2, 3, 5)
FIXED_INTERVALS = (2, 3, 5)  # rule="fixed": one call every k steps after the warm-up
DRIFT_THRESHOLDS = (0.06, 0.15)  # the shipped rule at other thresholds (ours is its default, 0.1)
DRIFT_MAX_SKIPS = 6
CRITERION = RULE_DEFAULTS["criterion"]  # (delta, C_max) of the criterion row: the previous default
SWEEP_STEPS = (30, 50)
SWEEP_CALLS_TARGET, SWEEP_PSNR_TARGET = 1.5, 35.0  # issue 17, item 9: every scheduler, 30 and 50 steps
CALLS_TARGET, SPEEDUP_TARGET, PSNR_TARGET = 2.0, 1.8, 26.0
PSNR_CAP = 100.0  # dB given to a pair of identical images (PSNR is infinite there) before averaging
COLUMNS = ["scheduler", "method", "steps", "denoiser_calls", "gmacs_per_image", "peak_memory_mb",
           "median_latency_ms", "speedup", "psnr_db", "lpips", "fid"]


@dataclass(frozen=True)
class Method:
    """One way to render: plain steps, the Skip hook, or DeepCache, at a batch size.

    Frozen, so it keys the render cache: a setting shared by the main table and an ablation
    (full steps, the default skip config, an iso-cost step count) is rendered once.
    """

    kind: str  # "plain" | "skip" | "deepcache"
    steps: int
    threshold: float = 0.0
    max_skips: int = 0
    compat: bool = False
    interval: int = 0
    batch: int = 1
    scale: str = "sigma"
    reuse: str = "noise"  # written out (not Skip's default) so that render keys never move with a default
    compiled: bool = False  # the denoiser under torch.compile (Inductor), the hook attached around it
    rule: str = "criterion"

    def skip_config(self) -> AdaptiveSkipConfig:
        return AdaptiveSkipConfig(threshold=self.threshold, max_skips=self.max_skips, per_sample=not self.compat,
                                  compat=self.compat, scale=self.scale, reuse=self.reuse, rule=self.rule)

    @contextlib.contextmanager
    def applied(self, pipe: Any) -> Iterator[None]:
        """Attach this method to ``pipe`` for the block, and take it off again."""
        if self.compiled:
            name = _denoiser_name(pipe)
            eager = getattr(pipe, name)
            setattr(pipe, name, _compiled_denoiser(pipe))
            try:
                with dataclasses.replace(self, compiled=False).applied(pipe):
                    yield
            finally:
                setattr(pipe, name, eager)
        elif self.kind == "skip":
            from stepsaver.skip.hook import disable_adaptive_skip, enable_adaptive_skip

            enable_adaptive_skip(pipe, self.skip_config())
            try:
                yield
            finally:
                disable_adaptive_skip(pipe)
        elif self.kind == "deepcache":
            from stepsaver.caches import deepcache_applied

            with deepcache_applied(pipe, self.interval):
                yield
        else:
            yield


def _denoiser_name(pipe: Any) -> str:
    """The pipeline attribute holding the denoiser: ``unet``, or ``transformer`` (Flux, SD3, PixArt)."""
    return "unet" if isinstance(getattr(pipe, "unet", None), torch.nn.Module) else "transformer"


def _compiled_denoiser(pipe: Any) -> torch.nn.Module:
    """One ``torch.compile`` (Inductor) of the pipeline's denoiser, kept with the pipeline and reused."""
    compiled = pipe.__dict__.get("_stepsaver_bench_compiled")
    if compiled is None:
        compiled = torch.compile(getattr(pipe, _denoiser_name(pipe)))
        pipe.__dict__["_stepsaver_bench_compiled"] = compiled
    return compiled


@dataclass
class _Render:
    image: np.ndarray  # uint8 HxWx3
    calls: int  # denoiser calls this image's trajectory made
    path: list[bool] | None = None  # skip flags per step (skip methods)


@dataclass
class SkipBenchConfig:
    """What ``bench_skip`` runs. Defaults are the issue's; the CLI exposes each as an option."""

    n: int = 200
    ablation_n: int = 50
    ablation_schedulers: tuple[str, ...] | None = None  # None: the first of ``schedulers``
    oracle_n: int = 10
    time_n: int = 50
    macs_n: int = 4
    schedulers: tuple[str, ...] = DEFAULT_SCHEDULERS
    steps: int = 50
    ablation_steps: tuple[int, ...] = ABLATION_STEPS
    deltas: tuple[float, ...] = DELTAS
    max_skips_grid: tuple[int, ...] = MAX_SKIPS_GRID
    deepcache_intervals: tuple[int, ...] = DEEPCACHE_INTERVALS
    fixed_intervals: tuple[int, ...] = FIXED_INTERVALS
    drift_thresholds: tuple[float, ...] = DRIFT_THRESHOLDS  # main-table rows: ours' rule at other thresholds
    drift_max_skips: int = DRIFT_MAX_SKIPS
    threshold: float | None = None  # of "ours"; None: Skip's shipped default
    max_skips: int | None = None
    batch: int = 8
    oracle_tolerance: float | None = None  # None: each prompt's estimator error
    seed: int = 0
    prompt_seed: int = 0
    guidance: float = 5.0
    model: str = "tiny"
    device: str = "auto"
    fid: bool = True
    compiled: bool = True  # rows with the UNet under torch.compile (Inductor), with and without the hook
    sweep_schedulers: tuple[str, ...] | None = None  # None: every scheduler of the registry
    sweep_steps: tuple[int, ...] = SWEEP_STEPS
    sweep_n: int = 24  # prompts of the scheduler sweep (0: no sweep)
    cache_dir: str | None = None  # renders kept on disk here: a killed run resumes, processes can share it
    threads: int | None = None  # torch CPU threads for the run (None: leave torch's setting)

    def __post_init__(self) -> None:
        shipped = AdaptiveSkipConfig()
        self.threshold = shipped.threshold if self.threshold is None else self.threshold
        self.max_skips = shipped.max_skips if self.max_skips is None else self.max_skips

    def ours(self, steps: int, **changes: Any) -> Method:
        """The shipped Skip setting at ``steps`` (its rule and reuse), with ``changes`` applied."""
        shipped = AdaptiveSkipConfig(threshold=self.threshold, max_skips=self.max_skips)
        method = Method("skip", steps, shipped.threshold, shipped.max_skips, scale=shipped.scale,
                        reuse=shipped.reuse, rule=shipped.rule)
        return dataclasses.replace(method, **changes)

    def criterion(self, steps: int, **changes: Any) -> Method:
        """The third-order criterion at its own defaults (the shipped default before the drift rule)."""
        return dataclasses.replace(Method("skip", steps, *CRITERION), **changes)

    def ablated(self) -> tuple[str, ...]:
        """The schedulers that get the ablations."""
        return self.schedulers[:1] if self.ablation_schedulers is None else self.ablation_schedulers

    def swept(self) -> tuple[str, ...]:
        """The schedulers of the sweep (every noise-schedule scheduler of the registry by default)."""
        from stepsaver.pipelines import SCHEDULERS

        if not self.sweep_n:
            return ()
        default = tuple(k for k, v in SCHEDULERS.items() if not v.flow)
        return default if self.sweep_schedulers is None else self.sweep_schedulers

    def validate(self) -> None:
        """One-line :class:`StepsaverError` for settings that cannot produce a report."""
        from stepsaver.generation import MAX_STEPS
        from stepsaver.pipelines import scheduler_spec

        if self.n < 2:
            raise StepsaverError(f"--n must be >= 2 (FID needs two images per set), got {self.n}")
        for name in ("ablation_n", "oracle_n", "time_n", "macs_n"):
            value = getattr(self, name)
            low = 1 if name in ("time_n", "macs_n") else 0
            if not low <= value <= self.n:
                raise StepsaverError(f"--{name.replace('_', '-')} must be in {low}..{self.n} (it reuses the first "
                                     f"--n prompts), got {value}")
        if not self.schedulers:
            raise StepsaverError("--schedulers is empty; name at least one, e.g. ddim")
        extra = sorted(set(self.ablated()) - set(self.schedulers))
        if extra:
            raise StepsaverError(f"--ablation-schedulers {extra} are not among --schedulers {list(self.schedulers)}")
        for s in self.schedulers:
            if scheduler_spec(s).second_order:
                raise StepsaverError(f"scheduler {s!r} calls the denoiser twice a step; bench skip compares "
                                     "first-order samplers (ddim, dpmpp_2m, euler, ...)")
        if not 0 <= self.sweep_n <= self.n:
            raise StepsaverError(f"--sweep-n must be in 0..{self.n} (it reuses the first --n prompts), "
                                 f"got {self.sweep_n}")
        for s in self.swept():
            scheduler_spec(s)  # a clear error on an unknown name
        for value in (self.steps, *self.ablation_steps, *self.sweep_steps):
            if not 5 <= value <= MAX_STEPS:
                raise StepsaverError(f"step counts must be in 5..{MAX_STEPS} (4 warm-up steps, then skips), "
                                     f"got {value}")
        if self.batch < 1 or any(k < 1 for k in self.deepcache_intervals):
            raise StepsaverError("--batch and DeepCache intervals must be >= 1")
        if any(k < 2 for k in self.fixed_intervals):
            raise StepsaverError(f"fixed intervals must be >= 2 (one call every k steps), got {self.fixed_intervals}")
        if self.threshold < 0 or self.max_skips < 0 or any(d < 0 for d in self.deltas) or \
                any(c < 0 for c in self.max_skips_grid):
            raise StepsaverError("skip thresholds and max-skips must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise StepsaverError(f"--threads must be >= 1, got {self.threads}")
        if self.oracle_tolerance is not None and not self.oracle_tolerance >= 0:
            raise StepsaverError(f"--oracle-tolerance must be >= 0, got {self.oracle_tolerance}")


# --- measuring one render ----------------------------------------------------------------------

def _render(pipe: Any, method: Method, prompts: Sequence[str], seeds: Sequence[int],
            guidance: float) -> tuple[list[_Render], float]:
    """Render ``prompts`` in one pipeline call with ``method``; the renders and the call's seconds."""
    from stepsaver.generation import generate_images

    with method.applied(pipe):
        results = generate_images(pipe, list(prompts), steps=method.steps, seeds=list(seeds), guidance=guidance)
    renders = [_Render(np.asarray(r.image.convert("RGB")), r.denoiser_calls, r.path) for r in results]
    return renders, results[0].seconds


def peak_memory_bytes(fn: Any, device: str | torch.device = "cpu") -> int:
    """Bytes allocated by ``fn()`` at its peak, above what was allocated when it started.

    CUDA: ``max_memory_allocated`` minus the allocation at the start. CPU has no allocator
    statistics, and the process high-water mark (``ru_maxrss``) never goes down, so it cannot tell
    methods apart; there the torch profiler's memory events (every allocation and free, in
    order) are summed and their running maximum taken. Either way the weights are excluded.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return int(torch.cuda.max_memory_allocated(dev) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return int(peak)


# --- quality -------------------------------------------------------------------------------------

def _psnr(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    from stepsaver.measure.quality import psnr

    values = psnr(images, reference).double().numpy()
    return np.minimum(np.nan_to_num(values, posinf=PSNR_CAP), PSNR_CAP)


def _lpips(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    from stepsaver.measure.lpips import lpips_distance

    def to_t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    return np.concatenate([lpips_distance(to_t(images[i:i + 64]), to_t(reference[i:i + 64])).double().numpy()
                           for i in range(0, len(images), 64)])


def _mean(values: Sequence[float] | np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else math.nan


# --- targets --------------------------------------------------------------------------------------

def _row(rows: Sequence[dict], scheduler: str, key: str) -> dict | None:
    return next((r for r in rows if r["scheduler"] == scheduler and r["key"] == key), None)


def _beats_fixed(rows: Sequence[dict], scheduler: str, ours: dict) -> dict[str, Any]:
    """Target 4 for one scheduler (empty when the run had no fixed-interval rows)."""
    fixed = [r for r in rows if r["scheduler"] == scheduler and r["key"].startswith("fixed_")]
    if not fixed:
        return {}
    cheaper = [r for r in fixed if r["denoiser_calls"] <= ours["denoiser_calls"]]
    beaten = [r for r in cheaper if ours["psnr_db"] > r["psnr_db"] and ours["lpips"] < r["lpips"]]
    detail = "; ".join(f"{r['method']}: {r['denoiser_calls']:.1f} calls, {r['psnr_db']:.2f} dB, LPIPS "
                       f"{r['lpips']:.4f}" for r in fixed)
    if not cheaper:
        holds, verdict = None, "not comparable (every fixed interval made more calls than ours)"
    else:
        holds = len(beaten) == len(cheaper)
        verdict = "holds" if holds else "does not hold"
    return {f"beats_fixed_{scheduler}": {
        "holds": holds, "compared": [r["method"] for r in cheaper], "beaten": [r["method"] for r in beaten],
        "text": f"**Target 4 ({scheduler}, beat fixed-interval skipping at no more calls): {verdict}** — ours "
                f"{ours['denoiser_calls']:.1f} calls, {ours['psnr_db']:.2f} dB, LPIPS {ours['lpips']:.4f}; {detail}."}}


def targets(rows: Sequence[dict], grid: Sequence[dict], steps: int) -> dict[str, Any]:
    """Issue 4's targets, decided from the rows; each entry has ``holds`` and a plain sentence.

    1. DDIM at ``steps``: >= 2x fewer denoiser calls and >= 1.8x wall-clock at PSNR >= 26 dB.
    2. Per scheduler: higher PSNR and lower LPIPS than every DeepCache interval that is no faster
       than ours (equal or greater speedup for ours).
    3. Per scheduler: ours vs the iso-cost fixed-step baseline (higher PSNR and lower LPIPS), and
       the ablation settings that beat their own iso-cost baseline.
    4. Per scheduler: higher PSNR and lower LPIPS than every fixed-interval row that makes no more
       denoiser calls than ours (the criterion must beat skipping on a timer).
    """
    out: dict[str, Any] = {}
    full, ours = _row(rows, "ddim", "full"), _row(rows, "ddim", "ours")
    if full is None or ours is None:
        out["calls_speed_quality"] = {"holds": None, "text": "**Target 1 (DDIM): not evaluated** — DDIM was not "
                                                             "among the benchmarked schedulers."}
    else:
        ratio = full["denoiser_calls"] / ours["denoiser_calls"]
        ok = [ratio >= CALLS_TARGET, ours["speedup"] >= SPEEDUP_TARGET, ours["psnr_db"] >= PSNR_TARGET]
        note = "" if steps == 50 else f" (the issue states it at 50 steps; this run used {steps})"
        out["calls_speed_quality"] = {
            "holds": all(ok), "calls_ratio": ratio, "speedup": ours["speedup"], "psnr_db": ours["psnr_db"],
            "text": f"**Target 1 (DDIM, {steps} steps{note}): {'holds' if all(ok) else 'does not hold'}** — "
                    f"{ratio:.2f}x fewer denoiser calls (need >= {CALLS_TARGET:g}: {'yes' if ok[0] else 'no'}), "
                    f"{ours['speedup']:.2f}x wall-clock (need >= {SPEEDUP_TARGET:g}: {'yes' if ok[1] else 'no'}), "
                    f"PSNR {ours['psnr_db']:.2f} dB (need >= {PSNR_TARGET:g}: {'yes' if ok[2] else 'no'})."}
    for scheduler in dict.fromkeys(r["scheduler"] for r in rows):
        ours = _row(rows, scheduler, "ours")
        if ours is None:
            continue
        caches = [r for r in rows if r["scheduler"] == scheduler and r["key"].startswith("deepcache")]
        if caches:  # none on a transformer model: DeepCache caches a UNet's blocks
            slower = [r for r in caches if r["speedup"] <= ours["speedup"]]
            beaten = [r for r in slower if ours["psnr_db"] > r["psnr_db"] and ours["lpips"] < r["lpips"]]
            detail = "; ".join(f"{r['method']}: {r['speedup']:.2f}x, {r['psnr_db']:.2f} dB, LPIPS {r['lpips']:.4f}"
                               for r in caches)
            mine = f"ours {ours['speedup']:.2f}x, {ours['psnr_db']:.2f} dB, LPIPS {ours['lpips']:.4f}"
            if not slower:
                holds, verdict = None, "not comparable (every DeepCache interval was faster than ours)"
            else:
                holds = len(beaten) == len(slower)
                verdict = "holds" if holds else "does not hold"
            out[f"beats_deepcache_{scheduler}"] = {
                "holds": holds, "compared": [r["method"] for r in slower], "beaten": [r["method"] for r in beaten],
                "text": f"**Target 2 ({scheduler}, beat DeepCache at equal or greater speedup): {verdict}** — "
                        f"{mine}; {detail}."}
        out.update(_beats_fixed(rows, scheduler, ours))
        iso = _row(rows, scheduler, "iso")
        if iso is None:
            continue
        beats = ours["psnr_db"] > iso["psnr_db"] and ours["lpips"] < iso["lpips"]
        cells = [g for g in grid if g["scheduler"] == scheduler and g.get("beats_iso")]
        listed = ", ".join(f"threshold={g['threshold']:g}/C_max={g['max_skips']} ({g['psnr_db']:.2f} vs "
                           f"{g['iso_psnr_db']:.2f} dB at {g['iso_steps']} steps)" for g in cells)
        n_cells = sum(g["scheduler"] == scheduler for g in grid)
        alt = (f" Ablation settings that beat their own iso-cost baseline (PSNR and LPIPS): {listed}."
               if cells else f" None of the {n_cells} ablation settings beat their own iso-cost baseline."
               if n_cells else "")
        out[f"beats_iso_{scheduler}"] = {
            "holds": beats, "settings_that_beat_iso": [(g["threshold"], g["max_skips"]) for g in cells],
            "text": f"**Target 3 ({scheduler}, beat iso-cost fixed steps): {'beats' if beats else 'does not beat'}"
                    f"** — ours {ours['denoiser_calls']:.1f} calls, {ours['psnr_db']:.2f} dB, LPIPS "
                    f"{ours['lpips']:.4f} vs fixed {iso['steps']} steps {iso['psnr_db']:.2f} dB, LPIPS "
                    f"{iso['lpips']:.4f}.{alt}"}
    return out


# --- the benchmark ------------------------------------------------------------------------------

class _Bar:
    """A Rich progress bar whose total grows as stages are planned (render counts are known late)."""

    def __init__(self, show: bool) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(TextColumn("{task.description:<36}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                                 disable=not show)
        self.task = self.progress.add_task("bench skip", total=0)

    def plan(self, n: int) -> None:
        self.progress.update(self.task, total=(self.progress.tasks[0].total or 0) + n)

    def step(self, description: str, n: int = 1) -> None:
        self.progress.update(self.task, advance=n, description=description)


class _DiskCache:
    """Renders on disk, one ``.npz`` per prompt under a folder per (model, scheduler, method, settings).

    Why: the full benchmark is hours of CPU; a run killed half-way (or a second process working on
    another scheduler with the same folder) keeps every image already rendered. The folder name
    hashes everything that decides an image (a fingerprint of the denoiser and VAE weights, the
    scheduler, the method, guidance, seeds), and each file keeps its prompt, so a retrained model
    or changed scene vocabulary never reuses stale images. Files are written atomically.
    """

    def __init__(self, root: Path, cfg: SkipBenchConfig, pipe: Any) -> None:
        from stepsaver.calibrate.config import quick_weights_digest
        from stepsaver.calls import denoiser_of

        self.root = root
        self.weights = quick_weights_digest(denoiser_of(pipe), getattr(pipe, "vae", None))[:16]
        self.settings = {"guidance": cfg.guidance, "seed": cfg.seed, "prompt_seed": cfg.prompt_seed}

    def folder(self, scheduler: str, method: Method) -> Path:
        import hashlib

        fields = dataclasses.asdict(method)
        if fields["rule"] == "criterion":  # added later: the criterion's renders keep their folders
            del fields["rule"]
        key = json.dumps({"weights": self.weights, "scheduler": scheduler, **self.settings, **fields},
                         sort_keys=True)
        name = f"{scheduler}-{method.kind}-{method.steps}-" + hashlib.sha1(key.encode()).hexdigest()[:12]
        return self.root / name

    def load(self, scheduler: str, method: Method, indices: Sequence[int],
             prompts: Sequence[str]) -> dict[int, _Render]:
        folder, found = self.folder(scheduler, method), {}
        for i in indices:
            path = folder / f"{i:05d}.npz"
            if not path.exists():
                continue
            try:
                with np.load(path) as z:
                    if str(z["prompt"]) != prompts[i]:
                        continue
                    skip_path = [bool(x) for x in z["path"]] if z["has_path"] else None
                    found[i] = _Render(z["image"].copy(), int(z["calls"]), skip_path)
            except (OSError, ValueError, KeyError):  # a torn or foreign file: render it again
                continue
        return found

    def save(self, scheduler: str, method: Method, indices: Sequence[int], renders: Sequence[_Render],
             prompts: Sequence[str]) -> None:
        import os

        folder = self.folder(scheduler, method)
        folder.mkdir(parents=True, exist_ok=True)
        for i, r in zip(indices, renders, strict=True):
            tmp = folder / f".{i:05d}.{os.getpid()}.npz"
            np.savez(tmp, image=r.image, calls=r.calls, prompt=prompts[i], has_path=r.path is not None,
                     path=np.asarray(r.path or [], dtype=bool))
            os.replace(tmp, folder / f"{i:05d}.npz")


class _Bench:
    """The state of one run: the pipeline, the prompts, and every render, cached by method."""

    def __init__(self, cfg: SkipBenchConfig, bar: _Bar) -> None:
        from stepsaver.pipelines import is_flow_matching, load_pipeline, schedulers_for
        from stepsaver.scenes import SceneGenerator

        self.cfg, self.bar = cfg, bar
        gen = SceneGenerator(seed=cfg.prompt_seed, split="eval")
        self.prompts = [gen.sample(i).caption for i in range(cfg.n)]
        self.seeds = [cfg.seed + i for i in range(cfg.n)]
        self.pipe = load_pipeline(cfg.model, scheduler=None, device=cfg.device)
        self.base_config = dict(self.pipe.scheduler.config)
        self.notes: list[str] = []
        fit = schedulers_for(self.base_config)
        wrong = [s for s in (*cfg.schedulers, *(cfg.sweep_schedulers or ())) if s not in fit]
        if wrong:
            kind = "a flow-matching" if is_flow_matching(self.base_config) else "a noise-schedule"
            raise StepsaverError(f"scheduler(s) {', '.join(wrong)} do not fit {cfg.model!r} ({kind} model); "
                                 f"use --schedulers / --sweep-schedulers from: {', '.join(fit)}")
        if cfg.sweep_n and cfg.sweep_schedulers is None:  # every scheduler of the registry that fits the model
            cfg = dataclasses.replace(cfg, sweep_schedulers=tuple(fit))
        if cfg.deepcache_intervals and _denoiser_name(self.pipe) != "unet":
            cfg = dataclasses.replace(cfg, deepcache_intervals=())
            self.notes.append(f"DeepCache rows are left out: DeepCache caches a UNet's blocks and "
                              f"{type(self.pipe).__name__} has a transformer (bench caches compares diffusers' "
                              "caches on it).")
        self.cfg = cfg
        self.device = getattr(self.pipe, "device", torch.device("cpu"))
        self.cache: dict[tuple[str, Method], dict[int, _Render]] = {}
        self.scheduler = ""
        self.disk = _DiskCache(Path(cfg.cache_dir), cfg, self.pipe) if cfg.cache_dir else None

    def use(self, scheduler: str) -> None:
        from stepsaver.pipelines import make_scheduler

        self.pipe.scheduler = make_scheduler(scheduler, self.base_config)
        self.scheduler = scheduler

    def renders(self, method: Method, count: int, label: str) -> list[_Render]:
        """Renders of prompts ``0..count-1`` with ``method`` (cached; only missing ones are run)."""
        store = self.cache.setdefault((self.scheduler, method), {})
        if self.disk is not None:
            store.update(self.disk.load(self.scheduler, method, [i for i in range(count) if i not in store],
                                        self.prompts))
        missing = [i for i in range(count) if i not in store]
        groups = [missing[k:k + method.batch] for k in range(0, len(missing), method.batch)]
        self.bar.plan(len(groups))
        for group in groups:
            out, _ = _render(self.pipe, method, [self.prompts[i] for i in group], [self.seeds[i] for i in group],
                             self.cfg.guidance)
            store.update(zip(group, out, strict=True))
            if self.disk is not None:
                self.disk.save(self.scheduler, method, group, out, self.prompts)
            self.bar.step(f"{self.scheduler}: {label}")
        return [store[i] for i in range(count)]

    def timed(self, method: Method, start: int) -> float:
        """Seconds per image of one call on prompts ``start..start+batch-1`` (images discarded)."""
        idx = list(range(start, min(start + method.batch, self.cfg.n)))
        _, seconds = _render(self.pipe, method, [self.prompts[i] for i in idx], [self.seeds[i] for i in idx],
                             self.cfg.guidance)
        return seconds / len(idx)

    def macs_and_memory(self, method: Method) -> tuple[float, float]:
        """MACs per image over the first ``macs_n`` prompts (whole batches for batched methods), peak MB."""
        from stepsaver.measure.cost import count_macs

        starts = list(range(0, self.cfg.macs_n, method.batch)) or [0]
        total = images = 0
        for start in starts:
            idx = list(range(start, min(start + method.batch, self.cfg.n)))
            total += count_macs(lambda idx=idx: _render(self.pipe, method, [self.prompts[i] for i in idx],
                                                         [self.seeds[i] for i in idx], self.cfg.guidance))
            images += len(idx)
            self.bar.step(f"{self.scheduler}: MACs")
        idx = list(range(min(method.batch, self.cfg.n)))
        peak = peak_memory_bytes(lambda: _render(self.pipe, method, [self.prompts[i] for i in idx],
                                                 [self.seeds[i] for i in idx], self.cfg.guidance), self.device)
        self.bar.step(f"{self.scheduler}: peak memory")
        return total / images, peak / 2**20


def _quality(renders: Sequence[_Render], reference: Sequence[_Render]) -> dict[str, Any]:
    images = np.stack([r.image for r in renders])
    ref = np.stack([r.image for r in reference])
    psnr, lp = _psnr(images, ref), _lpips(images, ref)
    calls = [r.calls for r in renders]
    return {"denoiser_calls": _mean(calls), "psnr_db": _mean(psnr), "lpips": _mean(lp),
            "psnr_median_db": float(np.median(psnr)), "psnr_min_db": float(np.min(psnr)),
            "per_image": {"calls": calls, "psnr_db": [round(float(v), 3) for v in psnr],
                          "lpips": [round(float(v), 5) for v in lp]}}


def _main_methods(cfg: SkipBenchConfig) -> list[tuple[str, str, Method]]:
    """(key, row label, method) of the main table, except the iso-cost row (known after ours)."""
    s = cfg.steps
    ours = cfg.ours(s)
    rows = [("full", f"full {s} steps", Method("plain", s)),
            ("ours", f"ours ({ours.rule} rule, threshold={ours.threshold:g}, C_max={ours.max_skips}, "
                     f"reuse={ours.reuse})", ours),
            ("ours_batch", f"ours per-sample, batch {cfg.batch}", dataclasses.replace(ours, batch=cfg.batch)),
            ("criterion", f"criterion (delta={CRITERION[0]:g}, C_max={CRITERION[1]}; the previous default)",
             cfg.criterion(s)),
            ("paper", "paper rule (latent differences, raw reuse, delta=0.01)",
             cfg.criterion(s, threshold=0.01, scale="latent", reuse="output")),
            ("compat", "official-compat", cfg.criterion(s, threshold=0.01, compat=True, scale="latent",
                                                        reuse="output"))]
    if cfg.compiled:
        rows += [("full_compiled", f"full {s} steps, torch.compile", Method("plain", s, compiled=True)),
                 ("ours_compiled", "ours, torch.compile", dataclasses.replace(ours, compiled=True))]
    rows += [(f"deepcache_{k}", f"DeepCache interval {k}", Method("deepcache", s, interval=k))
             for k in cfg.deepcache_intervals]
    rows += [(f"fixed_{k}", f"fixed interval {k} (our hook, no criterion)",
              Method("skip", s, 0.0, k - 1, rule="fixed")) for k in cfg.fixed_intervals]
    rows += [(f"drift_{t:g}", f"ours, {ours.rule} rule (threshold={t:g}, C_max={cfg.drift_max_skips})",
              cfg.ours(s, threshold=t, max_skips=cfg.drift_max_skips)) for t in cfg.drift_thresholds]
    return rows


def _scheduler_block(bench: _Bench, scheduler: str) -> tuple[list[dict], list[dict], list[dict], dict]:
    """Main rows, grid ablation rows, steps ablation rows and timing details of one scheduler."""
    cfg = bench.cfg
    bench.use(scheduler)
    methods = _main_methods(cfg)
    results: dict[str, list[_Render]] = {}
    for key, label, method in methods:
        results[key] = bench.renders(method, cfg.n, label)
    ours_calls = _mean([r.calls for r in results["ours"]])
    per_step = _calls_per_step(_mean([r.calls for r in results["full"]]), scheduler, cfg.steps)
    iso_steps = _iso_steps(ours_calls, scheduler, cfg.steps, per_step)
    methods.append(("iso", f"iso-cost fixed {iso_steps} steps", Method("plain", iso_steps)))
    results["iso"] = bench.renders(methods[-1][2], cfg.n, methods[-1][1])
    reference = results["full"]

    # ablations (first ablation_n prompts)
    grid_rows: list[dict] = []
    steps_rows: list[dict] = []
    m = cfg.ablation_n if scheduler in cfg.ablated() else 0
    if m:
        ref_m = reference[:m]
        full_calls = _mean([r.calls for r in ref_m])
        for delta in cfg.deltas:
            for c_max in cfg.max_skips_grid:
                cell = bench.renders(cfg.ours(cfg.steps, threshold=delta, max_skips=c_max), m,
                                     f"ablation threshold={delta:g} C={c_max}")
                q = _quality(cell, ref_m)
                n_iso = _iso_steps(q["denoiser_calls"], scheduler, cfg.steps, per_step)
                iso_q = _quality(bench.renders(Method("plain", n_iso), m, f"ablation iso {n_iso} steps"), ref_m)
                grid_rows.append({"scheduler": scheduler, "threshold": delta, "max_skips": c_max,
                                  "denoiser_calls": q["denoiser_calls"],
                                  "call_reduction": full_calls / q["denoiser_calls"],
                                  "psnr_db": q["psnr_db"], "lpips": q["lpips"], "iso_steps": n_iso,
                                  "iso_psnr_db": iso_q["psnr_db"], "iso_lpips": iso_q["lpips"],
                                  "beats_iso": q["psnr_db"] > iso_q["psnr_db"] and q["lpips"] < iso_q["lpips"]})
        for n_steps in cfg.ablation_steps:
            full_n = bench.renders(Method("plain", n_steps), m, f"ablation full {n_steps} steps")
            ours_n = bench.renders(cfg.ours(n_steps), m,
                                   f"ablation ours {n_steps} steps")
            q = _quality(ours_n, full_n)
            steps_rows.append({"scheduler": scheduler, "steps": n_steps, "full_calls": _mean([r.calls for r in full_n]),
                               "ours_calls": q["denoiser_calls"],
                               "call_reduction": _mean([r.calls for r in full_n]) / q["denoiser_calls"],
                               "psnr_vs_full_same_steps_db": q["psnr_db"], "lpips_vs_full_same_steps": q["lpips"],
                               "ours_psnr_vs_reference_db": _quality(ours_n, ref_m)["psnr_db"],
                               "full_psnr_vs_reference_db": _quality(full_n, ref_m)["psnr_db"]})

    # MACs and peak memory
    macs: dict[str, tuple[float, float]] = {}
    for key, _, method in methods:
        if method.compiled:  # FlopCounterMode does not see inside Inductor's kernels: the same network's count
            continue
        bench.bar.plan(len(range(0, cfg.macs_n, method.batch)) + 1)
        macs[key] = bench.macs_and_memory(method)
    for key, _, method in methods:
        if method.compiled:
            twin = next(k for k, _, m in methods if m == dataclasses.replace(method, compiled=False))
            macs[key] = macs[twin]
    full_batch = Method("plain", cfg.steps, batch=cfg.batch)

    # timing: round robin over the first time_n prompts, after one untimed call of each method
    timing_methods = [(key, method) for key, _, method in methods if method.batch == 1]
    batched = [(key, method) for key, _, method in methods if method.batch > 1] + [("full_batch", full_batch)]
    starts = list(range(0, cfg.time_n, cfg.batch))
    bench.bar.plan(len(timing_methods) + len(batched) + cfg.time_n * len(timing_methods) + len(starts) * len(batched))
    for _key, method in timing_methods + batched:
        bench.timed(method, 0)
        bench.bar.step(f"{scheduler}: warm-up")
    seconds: dict[str, list[float]] = {key: [] for key, _ in timing_methods + batched}
    for i in range(cfg.time_n):
        for key, method in timing_methods:
            seconds[key].append(bench.timed(method, i))
            bench.bar.step(f"{scheduler}: timing")
    for start in starts:
        for key, method in batched:
            seconds[key].append(bench.timed(method, start))
            bench.bar.step(f"{scheduler}: timing (batch {cfg.batch})")
    median = {key: statistics.median(v) for key, v in seconds.items()}

    # quality and the table
    fid_ref = None
    if cfg.fid:
        from stepsaver.measure.fid import features

        fid_ref = features(np.stack([r.image for r in reference]))
    rows = []
    for key, label, method in methods:
        q = _quality(results[key], reference)
        baseline = median["full_batch"] if method.batch > 1 else median["full"]
        fid = None
        if cfg.fid:
            from stepsaver.measure.fid import features, fid_from_features

            images = np.stack([r.image for r in results[key]])
            fid = 0.0 if key == "full" else fid_from_features(fid_ref, features(images))
        rows.append({"scheduler": scheduler, "method": label, "key": key, "steps": method.steps,
                     "denoiser_calls": q["denoiser_calls"], "gmacs_per_image": macs[key][0] / 1e9,
                     "peak_memory_mb": macs[key][1], "median_latency_ms": median[key] * 1e3,
                     "speedup": baseline / median[key], "psnr_db": None if key == "full" else q["psnr_db"],
                     "lpips": q["lpips"], "fid": fid, "psnr_median_db": q["psnr_median_db"],
                     "psnr_min_db": q["psnr_min_db"], "batch": method.batch, "per_image": q["per_image"],
                     "paths": [r.path for r in results[key]] if method.kind == "skip" else None})
    timing = {"time_n": cfg.time_n, "median_s": median, "full_batch_median_latency_ms": median["full_batch"] * 1e3,
              "iso_steps": iso_steps}
    return rows, grid_rows, steps_rows, timing


def _steps_calls(scheduler: str, steps: int) -> int:
    """Denoiser calls of ``steps`` plain steps at one call per step (a second-order sampler: ``2N - 1``)."""
    from stepsaver.pipelines import scheduler_spec

    return 2 * steps - 1 if scheduler_spec(scheduler).second_order else steps


def _calls_per_step(full_calls: float, scheduler: str, steps: int) -> int:
    """How many denoiser calls the pipeline makes per sampler step: 1, or 2 where it splits
    classifier-free guidance into two calls (Flux's true CFG), read off the full run."""
    return max(1, round(full_calls / _steps_calls(scheduler, steps)))


def _iso_steps(calls: float, scheduler: str, most: int, per_step: int = 1) -> int:
    """Plain steps that cost ``calls`` denoiser calls (a second-order sampler makes ``2N - 1`` in ``N`` steps;
    a pipeline that splits CFG into two calls makes ``per_step`` = 2 per step)."""
    from stepsaver.pipelines import scheduler_spec

    c = calls / per_step
    n = round((c + 1) / 2) if scheduler_spec(scheduler).second_order else round(c)
    return max(1, min(most, n))


def _sweep(bench: _Bench) -> list[dict]:
    """Ours, the criterion, the paper's rule and iso-cost plain steps on every scheduler of the sweep, per step count.

    Batches of ``batch`` prompts (per-sample paths: the same images as single calls, to float
    tolerance), the first ``sweep_n`` prompts, quality against the same scheduler's full run.
    """
    cfg = bench.cfg
    rows: list[dict] = []
    m, b = cfg.sweep_n, cfg.batch
    for scheduler in cfg.swept():
        bench.use(scheduler)
        for steps in cfg.sweep_steps:
            full = bench.renders(Method("plain", steps, batch=b), m, f"sweep full {steps}")
            full_calls = _mean([r.calls for r in full])
            per_step = _calls_per_step(full_calls, scheduler, steps)
            methods = [("ours", cfg.ours(steps, batch=b)), ("criterion", cfg.criterion(steps, batch=b)),
                       ("paper", cfg.criterion(steps, threshold=0.01, batch=b, scale="latent", reuse="output"))]
            for key, method in methods:
                q = _quality(bench.renders(method, m, f"sweep {key} {steps}"), full)
                rows.append({"scheduler": scheduler, "steps": steps, "method": key, "full_calls": full_calls,
                             "denoiser_calls": q["denoiser_calls"], "call_reduction": full_calls / q["denoiser_calls"],
                             "psnr_db": q["psnr_db"], "psnr_min_db": q["psnr_min_db"], "lpips": q["lpips"]})
                if key in ("ours", "criterion"):
                    n_iso = _iso_steps(q["denoiser_calls"], scheduler, steps, per_step)
                    iso = _quality(bench.renders(Method("plain", n_iso, batch=b), m, f"sweep iso {n_iso}"), full)
                    rows.append({"scheduler": scheduler, "steps": steps, "method": f"iso-cost {n_iso} steps",
                                 "iso_of": key, "full_calls": full_calls, "denoiser_calls": iso["denoiser_calls"],
                                 "call_reduction": full_calls / iso["denoiser_calls"], "psnr_db": iso["psnr_db"],
                                 "psnr_min_db": iso["psnr_min_db"], "lpips": iso["lpips"]})
    for r in rows:
        r["meets_target"] = r["call_reduction"] >= SWEEP_CALLS_TARGET and r["psnr_db"] >= SWEEP_PSNR_TARGET
    return rows


def _sweep_verdict(rows: Sequence[dict], method: str = "ours") -> dict[str, Any]:
    """Issue 17, item 9: ours >= 1.5x fewer calls at PSNR >= 35 dB on every swept scheduler and step count.

    ``method="criterion"`` judges the criterion's sweep rows the same way (against its own
    iso-cost row of the cell: plain steps at its calls).
    """
    ours = [r for r in rows if r["method"] == method]
    failing = [f"{r['scheduler']}@{r['steps']} ({r['call_reduction']:.2f}x, {r['psnr_db']:.1f} dB)"
               for r in ours if not r["meets_target"]]
    beaten = [f"{r['scheduler']}@{r['steps']}" for r in ours
              if (iso := next((i for i in rows if i["scheduler"] == r["scheduler"] and i["steps"] == r["steps"]
                               and i.get("iso_of", "ours") == method and i["method"].startswith("iso")), None))
              and iso["psnr_db"] >= r["psnr_db"]]
    holds = bool(ours) and not failing
    who = "" if method == "ours" else f", {method} rule"
    text = (f"**Scheduler sweep{who} (>= {SWEEP_CALLS_TARGET:g}x fewer calls at PSNR >= {SWEEP_PSNR_TARGET:g} dB on "
            f"every scheduler and step count): {'holds' if holds else 'does not hold'}** — "
            f"{len(ours) - len(failing)} of {len(ours)} cells meet it"
            + (f"; failing: {', '.join(failing)}" if failing else "") + ". "
            + (f"Plain steps at the same calls match or beat ours on: {', '.join(beaten)}." if beaten else
               "Ours beats plain steps at the same calls (PSNR) in every cell."))
    return {"holds": holds, "failing": failing, "iso_not_beaten": beaten, "text": text}


def _oracle(bench: _Bench) -> dict[str, Any]:
    """Greedy oracle vs estimator on the first ``oracle_n`` prompts of the first scheduler."""
    from stepsaver.skip.hook import AdaptiveSkipConfig
    from stepsaver.skip.oracle import greedy_oracle, position_agreement, skip_position_chi2

    cfg = bench.cfg
    scheduler = cfg.schedulers[0]
    bench.use(scheduler)
    bench.bar.plan(cfg.oracle_n)
    results = []
    for i in range(cfg.oracle_n):
        r = greedy_oracle(bench.pipe, bench.prompts[i], steps=cfg.steps, seed=bench.seeds[i], guidance=cfg.guidance,
                          tolerance=cfg.oracle_tolerance, max_skips=cfg.max_skips,
                          estimator=AdaptiveSkipConfig(threshold=cfg.threshold, max_skips=cfg.max_skips))
        results.append(r)
        bench.bar.step(f"{scheduler}: oracle")
    if not results:
        return {}
    oracle_paths = [r.path for r in results]
    est_paths = [r.estimator_path for r in results]
    return {"scheduler": scheduler, "tolerance": "estimator's own error per prompt" if cfg.oracle_tolerance is None
            else cfg.oracle_tolerance, "metric": "relative L2 of the final latent",
            "agreement": position_agreement(oracle_paths, est_paths, results[0].first),
            "chi2": skip_position_chi2(oracle_paths, est_paths, results[0].first),
            "mean_oracle_skips": _mean([sum(p) for p in oracle_paths]),
            "mean_estimator_skips": _mean([sum(p) for p in est_paths]),
            "prompts": [r.to_dict() for r in results]}


# --- plots -----------------------------------------------------------------------------------------

def _plots(out: Path, rows: list[dict], grid: list[dict], oracle: dict, cfg: SkipBenchConfig) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    # PSNR vs speedup, every method
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    markers = {"ours": "o", "ours_batch": "s", "compat": "^", "iso": "D"}
    colours = dict(zip(cfg.schedulers, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for k, r in enumerate(rows):
        if r["psnr_db"] is None:
            continue
        marker = "x" if r["key"].startswith("deepcache") else "+" if r["key"].startswith("fixed_") else \
            "*" if r["key"].startswith("drift_") else \
            markers.get(r["key"], ".")
        ax.scatter(r["speedup"], r["psnr_db"], marker=marker, color=colours.get(r["scheduler"]), s=40)
        ax.annotate(r["key"].replace("deepcache_", "DC"), (r["speedup"], r["psnr_db"]), fontsize=6,
                    xytext=(3, 3 if k % 2 else -8), textcoords="offset points")  # alternate: neighbours collide
    ax.axhline(PSNR_TARGET, color="grey", lw=0.8, ls="--")
    ax.axvline(SPEEDUP_TARGET, color="grey", lw=0.8, ls="--")
    for s, c in colours.items():
        ax.scatter([], [], color=c, label=s)
    ax.set_xlabel("speedup vs full steps (median latency ratio)")
    ax.set_ylabel("PSNR vs full-step image (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "skip-psnr-vs-speedup.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    # ablation heatmap: PSNR and call reduction over threshold x C_max, one row per scheduler
    scheds = list(dict.fromkeys(g["scheduler"] for g in grid))
    if scheds:
        fig, axes = plt.subplots(len(scheds), 2, figsize=(7.5, 2.8 * len(scheds)), dpi=120, squeeze=False)
        for row_axes, s in zip(axes, scheds, strict=True):
            cells = {(g["threshold"], g["max_skips"]): g for g in grid if g["scheduler"] == s}
            for ax, key, title in ((row_axes[0], "psnr_db", "PSNR (dB)"), (row_axes[1], "call_reduction",
                                                                             "fewer calls (x)")):
                data = np.array([[cells[d, c][key] for c in cfg.max_skips_grid] for d in cfg.deltas])
                im = ax.imshow(data, cmap="viridis", aspect="auto")
                low, high = float(np.nanmin(data)), float(np.nanmax(data))
                for (a, b), v in np.ndenumerate(data):
                    star = "*" if key == "psnr_db" and cells[cfg.deltas[a], cfg.max_skips_grid[b]]["beats_iso"] else ""
                    bright = high > low and (v - low) / (high - low) > 0.6  # viridis turns yellow: dark text
                    ax.text(b, a, f"{v:.1f}{star}" if key == "psnr_db" else f"{v:.2f}", ha="center", va="center",
                            fontsize=7, color="black" if bright else "white")
                ax.set_xticks(range(len(cfg.max_skips_grid)), [str(c) for c in cfg.max_skips_grid])
                ax.set_yticks(range(len(cfg.deltas)), [f"{d:g}" for d in cfg.deltas])
                ax.set_xlabel("C_max")
                ax.set_ylabel("threshold")
                ax.set_title(f"{s}: {title}" + (" (* beats iso-cost)" if key == "psnr_db" else ""), fontsize=8)
                fig.colorbar(im, ax=ax)
        fig.tight_layout()
        paths.append(out / "skip-ablation.png")
        fig.savefig(paths[-1])
        plt.close(fig)

    # per-step skip paths: estimator vs oracle for a couple of prompts, and where each skips overall
    examples = oracle.get("prompts", [])[:2]
    if not examples:  # no oracle: show the estimator's paths of the first prompts
        ours = next((r for r in rows if r["key"] == "ours"), None)
        examples = [{"prompt": f"prompt {i}", "estimator_path": p, "path": None}
                    for i, p in enumerate((ours or {}).get("paths", [])[:2])]
    if examples:
        n_panels = len(examples) + (1 if oracle else 0)
        fig, axes = plt.subplots(n_panels, 1, figsize=(7.5, 1.3 * n_panels + 0.8), dpi=120, squeeze=False)
        for ax, ex in zip(axes[:, 0], examples, strict=False):
            lines = [("estimator", ex["estimator_path"])] + ([("oracle", ex["path"])] if ex["path"] else [])
            data = np.array([[1.0 if s else 0.0 for s in p] for _, p in lines])
            ax.imshow(data, cmap="Greys", aspect="auto", vmin=0, vmax=1)
            ax.set_yticks(range(len(lines)), [name for name, _ in lines], fontsize=7)
            ax.set_title(ex["prompt"][:90], fontsize=7)
            ax.set_xlabel("step (black = reused the previous output)", fontsize=7)
        if oracle:
            ax = axes[-1, 0]
            chi = oracle["chi2"]
            counts_o = [sum(bool(p["path"][s]) for p in oracle["prompts"]) for s in range(cfg.steps)]
            counts_e = [sum(bool(p["estimator_path"][s]) for p in oracle["prompts"]) for s in range(cfg.steps)]
            x = np.arange(cfg.steps)
            ax.bar(x - 0.2, counts_o, width=0.4, label="oracle")
            ax.bar(x + 0.2, counts_e, width=0.4, label="estimator")
            ax.set_title(f"skips per step over {len(oracle['prompts'])} prompts; chi-squared p = "
                         f"{chi['p_value']:.3g}, agreement {oracle['agreement']['overall']:.2f}", fontsize=8)
            ax.set_xlabel("step", fontsize=7)
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "skip-paths.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    return paths


def _sweep_plot(out: Path, sweep: Sequence[dict]) -> list[Path]:
    from stepsaver.measure.report import pyplot, save_plot

    plt = pyplot()

    steps = sorted({r["steps"] for r in sweep})
    fig, axes = plt.subplots(1, len(steps), figsize=(5.2 * len(steps), 4.2), dpi=120, squeeze=False)
    styles = {"ours": ("o", "C0"), "criterion": ("s", "C3"), "paper": ("^", "C1"), "iso": ("D", "C2")}
    for ax, n in zip(axes[0], steps, strict=True):
        for r in (r for r in sweep if r["steps"] == n):
            marker, colour = styles["iso" if r["method"].startswith("iso") else r["method"]]
            ax.scatter(r["call_reduction"], r["psnr_db"], marker=marker, color=colour, s=30)
            if r["method"] == "ours":
                ax.annotate(r["scheduler"], (r["call_reduction"], r["psnr_db"]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
        for name, (marker, colour) in styles.items():
            label = {"iso": "iso-cost plain steps", "criterion": "criterion (previous default)"}.get(name, name)
            ax.scatter([], [], marker=marker, color=colour, label=label)
        ax.axhline(SWEEP_PSNR_TARGET, color="grey", lw=0.8, ls="--")
        ax.axvline(SWEEP_CALLS_TARGET, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="fewer denoiser calls than the full run (x)", ylabel="PSNR vs the full run (dB)",
               title=f"every scheduler, {n} steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return [save_plot(fig, out / "skip-schedulers.png")]


# --- entry points ------------------------------------------------------------------------------------

def _fmt_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    from stepsaver.measure.report import markdown_table

    return markdown_table([{c: r.get(c) for c in columns} for r in rows], columns).replace("| None ", "| – ")


def bench_skip(cfg: SkipBenchConfig | None = None, out_dir: str | Path = "docs/results",
               show_progress: bool = True) -> dict[str, Any]:
    """Run the whole benchmark, write ``skip.json``, ``skip.md`` and the plots; return the payload.

    ``cfg.threads`` sets torch's CPU threads for the run and restores them afterwards: on a
    machine whose cores are shared with other jobs, two OpenMP threads can run 10-40x slower
    than one (spinning threads wait on descheduled ones), which would swamp every timing.
    """
    cfg = cfg or SkipBenchConfig()
    cfg.validate()
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _bench_skip(cfg, Path(out_dir), show_progress)
    finally:
        torch.set_num_threads(threads)


def _bench_skip(cfg: SkipBenchConfig, out: Path, show_progress: bool) -> dict[str, Any]:
    from stepsaver.measure.report import write_report

    t0 = time.perf_counter()
    bar = _Bar(show_progress)
    rows: list[dict] = []
    grid: list[dict] = []
    steps_rows: list[dict] = []
    timing: dict[str, Any] = {}
    with bar.progress:
        bench = _Bench(cfg, bar)
        cfg = bench.cfg  # completed for the model (its sweep schedulers; no DeepCache without a UNet)
        for scheduler in cfg.schedulers:
            r, g, s, t = _scheduler_block(bench, scheduler)
            rows += r
            grid += g
            steps_rows += s
            timing[scheduler] = t
        oracle = _oracle(bench) if cfg.oracle_n else {}
        sweep = _sweep(bench) if cfg.sweep_n else []
    verdicts = targets(rows, grid, cfg.steps)
    if sweep:
        verdicts["scheduler_sweep"] = _sweep_verdict(sweep)
        verdicts["scheduler_sweep_criterion"] = _sweep_verdict(sweep, "criterion")
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(out, rows, grid, oracle, cfg) + (_sweep_plot(out, sweep) if sweep else [])
    elapsed = time.perf_counter() - t0

    lines = [f"{len(cfg.schedulers)} scheduler(s), {cfg.n} held-out scene prompts (eval split), batch 1 unless "
             f"stated, seeds {cfg.seed}..{cfg.seed + cfg.n - 1}, guidance {cfg.guidance:g}; quality against the "
             f"full {cfg.steps}-step images of the same scheduler. Run took {elapsed / 60:.1f} min.",
             *(f"\n{note}" for note in bench.notes), "", "## Targets", ""]
    lines += [v["text"] for v in verdicts.values()]
    lines += ["", "## How to read the table", "",
              "* denoiser calls: mean per image. DeepCache calls the UNet every step but runs the full network "
              "only every k-th; its saving shows in MACs.",
              f"* MACs: FlopCounterMode over the first {cfg.macs_n} prompt(s) (one batch for batched rows), per image.",
              "* peak memory: bytes allocated above the start of the call (weights excluded); CPU: torch profiler "
              "memory events, CUDA: max_memory_allocated.",
              f"* latency: median per image over the first {cfg.time_n} prompt(s), every method run in turn on "
              f"each prompt; speedup = full median / method median. The batch-{cfg.batch} row is compared with "
              f"full steps at batch {cfg.batch} ("
              + ", ".join(f"{s}: {t['full_batch_median_latency_ms']:.1f} ms/image" for s, t in timing.items()) + ").",
              f"* PSNR: mean per image (identical images count as {PSNR_CAP:g} dB); LPIPS: AlexNet; FID: TF-Inception "
              f"features of the method's images vs the full-step images ({cfg.n} each; 64x64 upsampled)."]
    if grid:
        lines += ["", f"## Ablation: threshold x C_max of ours ({', '.join(cfg.ablated())}; {cfg.ablation_n} prompts, "
                      f"{cfg.steps} steps)", "",
                  "Each cell has its own iso-cost baseline: plain steps equal to the cell's mean calls, rounded.", "",
                  _fmt_table(grid, ["scheduler", "threshold", "max_skips", "denoiser_calls", "call_reduction",
                                    "psnr_db", "lpips", "iso_steps", "iso_psnr_db", "iso_lpips", "beats_iso"])]
    if steps_rows:
        lines += ["", f"## Ablation: step count ({', '.join(cfg.ablated())}; {cfg.ablation_n} prompts)", "",
                  "PSNR/LPIPS of ours against plain steps at the same count, and of both against the "
                  f"{cfg.steps}-step reference.", "",
                  _fmt_table(steps_rows, ["scheduler", "steps", "full_calls", "ours_calls", "call_reduction",
                                          "psnr_vs_full_same_steps_db", "lpips_vs_full_same_steps",
                                          "ours_psnr_vs_reference_db", "full_psnr_vs_reference_db"])]
    if sweep:
        shipped = cfg.ours(cfg.steps)
        lines += ["", f"## Every scheduler ({cfg.sweep_n} prompts, batch {cfg.batch}, steps "
                      f"{', '.join(map(str, cfg.sweep_steps))})", "",
                  f"ours: {shipped.rule} rule, threshold={shipped.threshold:g}, C_max={shipped.max_skips}, "
                  f"reuse='{shipped.reuse}' (noise, or x0 on schedulers that add fresh noise); criterion: "
                  f"delta={CRITERION[0]:g}, C_max={CRITERION[1]}, scale='sigma', reuse='noise'; paper: the "
                  f"criterion's C_max, delta=0.01 on raw latent differences with raw reuse; iso-cost: plain steps "
                  "at the calls of ours or the criterion (second-order samplers: 2N-1 calls in N steps; a "
                  "pipeline that splits CFG into two calls makes 2 a step). Quality "
                  "against the same scheduler's full run.", "",
                  _fmt_table(sweep, ["scheduler", "steps", "method", "denoiser_calls", "call_reduction", "psnr_db",
                                     "psnr_min_db", "lpips", "meets_target"])]
    if oracle:
        ag, chi = oracle["agreement"], oracle["chi2"]
        lines += ["", f"## Oracle vs estimator ({len(oracle['prompts'])} prompts, {oracle['scheduler']})", "",
                  f"Greedy oracle: a step is skipped when the final latent stays within the tolerance "
                  f"({oracle['tolerance']}; relative L2 of the final latent) of the full-step latent, C_max "
                  f"{cfg.max_skips}. Mean skips: oracle {oracle['mean_oracle_skips']:.1f}, estimator "
                  f"{oracle['mean_estimator_skips']:.1f}. Per-position agreement {ag['overall']:.3f} "
                  f"(both skip {ag['confusion']['both_skip']}, oracle only {ag['confusion']['only_a']}, estimator "
                  f"only {ag['confusion']['only_b']}, both compute {ag['confusion']['both_compute']}). Chi-squared "
                  f"test of skip positions: statistic {chi['statistic']:.3g}, dof {chi['dof']}, p = "
                  f"{chi['p_value']:.3g}{' (' + chi['reason'] + ')' if chi['reason'] else ''}"
                  + (f"; the smallest expected count is {chi['min_expected']:.2g}, below 5, so the p-value is "
                     "indicative only." if chi.get("min_expected", 5) < 5 else ".")]
    summary = "\n".join(lines)
    table_rows = [{k: v for k, v in r.items() if k not in ("per_image", "paths")} for r in rows]
    extra = {"config": dataclasses.asdict(cfg), "targets": verdicts, "ablation_grid": grid,
             "ablation_steps": steps_rows, "scheduler_sweep": sweep, "timing": timing, "oracle": oracle,
             "seconds": elapsed,
             "per_image": {f"{r['scheduler']}/{r['key']}": {**r["per_image"], "paths": r["paths"]} for r in rows}}
    extra = finite(extra)  # strict JSON: a nan p-value (degenerate chi-squared table) becomes null
    paths = write_report("skip", finite(table_rows),
                         title="Skip: AdaptiveDiffusion vs baselines on the embedded model", summary=summary,
                         extra=extra, plots=plots, out_dir=out, columns=COLUMNS)
    md = paths["md"].read_text().replace("| None ", "| – ")
    paths["md"].write_text(md)
    return {"rows": table_rows, "targets": verdicts, "seconds": elapsed, "json": str(paths["json"]),
            "md": str(paths["md"]), "plots": [str(p) for p in plots]}
