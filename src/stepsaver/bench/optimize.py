"""``stepsaver bench optimize``: issue 21 part 1's targets for ``stepsaver optimize``, measured in one run.

For each model (the embedded ``tiny`` and ``tiny-flux`` by default), on this machine:

* **each lever alone and the chosen combination**: :func:`stepsaver.shrink.optimize.optimize_pipeline`
  runs as ``stepsaver optimize --batch 1,8`` does, and its records are the table: per-iteration
  latency at each batch size (``batch_sizes``: 1 and 8 by default; one denoiser call captured from a
  real batch-B pipeline call, interleaved with eager fp32 so background load slows both sides alike),
  quality of the final images vs eager fp32 (PSNR, LPIPS on the calibration prompts) and
  kept/dropped with the reason, the levers that lost or failed included. A lever is judged by its
  worst batch size, so the chosen one is the fastest at all of them. Nothing here re-implements
  or re-times a lever: the end-to-end rows rebuild the chosen levers with
  :func:`~stepsaver.shrink.optimize.apply_levers` and the parameters optimize recorded. "Per
  iteration" is one denoiser call: the CFG pair of a UNet is one call of batch 2B, Flux's true CFG
  two calls of batch B per step; the ratio is what the target reads.
* **end to end**: a full image at ``steps`` (50) steps, batch 1, through
  :func:`stepsaver.generation.generate_images`, for eager fp32, eager + Skip (the default
  :class:`~stepsaver.skip.AdaptiveSkipConfig`), the chosen levers, and chosen + Skip; every
  variant in turn on each prompt and repeat (rotating the order), medians, ratios vs eager, and
  PSNR/LPIPS vs the eager 50-step image of the same prompt and seed.
* **cost and CO2 per 10k images** from the measured end-to-end median (see :data:`COST_FORMULA`).

Targets (issue 21): the chosen setting is >= 1.4x faster per iteration than eager fp32 without
quality loss (it passed optimize's rule: PSNR >= 35 dB and LPIPS <= 0.01 on every calibration
prompt), at every batch size timed; and chosen + Skip is >= 3x faster end to end at 50 steps.
Each model gets a verdict line saying plainly held / not held, with the numbers.

A lever that fails to build or run (at any batch size) is reported, never fatal (optimize's rule).
Invalid settings raise :class:`~stepsaver.errors.StepsaverError` before any model loads. This
module imports neither torch nor the levers at import time, so the CLI's
``--help`` stays cheap.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stepsaver.errors import StepsaverError
from stepsaver.jsonsafe import finite
from stepsaver.skip.config import AdaptiveSkipConfig

__all__ = ["COST_FORMULA", "OptimizeBenchConfig", "bench_optimize", "cost_per_10k", "optimize_verdicts"]

COST_FORMULA = ("hours per 10k images = median end-to-end seconds per image x 10,000 / 3,600; "
                "cost = hours x price ($/hour); CO2 = hours x power (W) / 1,000 x grid intensity (gCO2/kWh), "
                "i.e. one machine making one image at a time, fully used, nothing else on it")
VARIANTS = ("eager", "eager + Skip", "chosen", "chosen + Skip")


@dataclass
class OptimizeBenchConfig:
    """What :func:`bench_optimize` runs; the CLI exposes the fields as options.

    The defaults are sized for a 2-core CPU: 4 calibration prompts at 20 steps for the quality
    check and 2 prompts x 3 repeats end to end, aiming at ~15 CPU minutes for both embedded models
    (an estimate from the embedded UNet's ~21 ms per step, not a measured run). ``compile`` is the
    exception: Inductor takes minutes per new shape here and the run builds several (each batch
    size, the combination, the end-to-end copy); leave it out of ``levers`` for a quick run.
    ``min_speedup``, ``psnr_min`` and ``lpips_max`` of ``None`` are optimize's own keep rule.
    """

    models: tuple[str, ...] = ("tiny", "tiny-flux")
    levers: str | tuple[str, ...] | None = None  # None or "all": every lever (unavailable ones are reported)
    n: int = 4  # calibration prompts of the quality check (training-scene captions)
    quality_steps: int = 20  # steps of the quality check (optimize's default)
    repeats: int = 10  # timed denoiser calls per side, per lever and batch size (median)
    batch_sizes: tuple[int, ...] = (1, 8)
    steps: int = 50  # steps of the end-to-end image
    e2e_n: int = 2  # prompts rendered end to end
    e2e_repeats: int = 3  # times each prompt is timed per variant
    seed: int = 0
    guidance: float = 5.0
    skip: AdaptiveSkipConfig = field(default_factory=AdaptiveSkipConfig)
    min_speedup: float | None = None
    psnr_min: float | None = None
    lpips_max: float | None = None
    price_per_hour: float = 0.10  # $ per machine hour: an assumption, about a small 2-vCPU cloud instance
    power_watts: float = 65.0  # what the machine draws while generating
    grid_g_co2_per_kwh: float = 400.0
    target_per_iteration: float = 1.4
    target_end_to_end: float = 3.0
    extra_call_kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self, need_models: bool = True) -> None:
        """One-line :class:`StepsaverError` naming the fix for any setting that cannot work."""
        from stepsaver.generation import MAX_STEPS, validate_seed

        if need_models and not self.models:
            raise StepsaverError("bench optimize needs at least one model; pass --model tiny (repeatable)")
        counts = {"n": ("calibration prompts", "--n 4"), "repeats": ("timed calls per side", "--repeats 10"),
                  "e2e_n": ("end-to-end prompts", "--e2e-n 2"),
                  "e2e_repeats": ("end-to-end repeats", "--e2e-repeats 3")}
        for name, (what, example) in counts.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StepsaverError(f"{name} ({what}) must be an integer >= 1, got {value!r}; pass e.g. {example}")
        for name, option in (("steps", "--steps 50"), ("quality_steps", "--quality-steps 20")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_STEPS:
                raise StepsaverError(f"{name} must be an integer in 1..{MAX_STEPS}, got {value!r}; pass e.g. {option}")
        sizes = tuple(self.batch_sizes)
        if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
            raise StepsaverError(f"batch sizes must be integers >= 1, got {sizes!r}; pass e.g. --batch 1,8")
        if len(set(sizes)) != len(sizes):
            raise StepsaverError(f"batch sizes repeat a value ({sizes!r}); list each once, e.g. --batch 1,8")
        for name, option, low_ok in (("price_per_hour", "--price 0.10", True), ("power_watts", "--power 65", True),
                                     ("grid_g_co2_per_kwh", "--intensity 400", True),
                                     ("guidance", "--guidance 5", True),
                                     ("target_per_iteration", "1.4", False), ("target_end_to_end", "3.0", False)):
            value = getattr(self, name)
            ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) \
                and (value >= 0 if low_ok else value > 0)
            if not ok:
                bound = ">= 0" if low_ok else "> 0"
                raise StepsaverError(f"{name} must be a finite number {bound}, got {value!r}; pass e.g. {option}")
        for name in ("min_speedup", "psnr_min", "lpips_max"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or (name != "psnr_min" and value <= 0)):
                raise StepsaverError(f"{name} must be a finite number{'' if name == 'psnr_min' else ' > 0'} "
                                     f"(or None: optimize's rule), got {value!r}")
        if not isinstance(self.skip, AdaptiveSkipConfig):
            raise StepsaverError(f"skip must be an AdaptiveSkipConfig, got {type(self.skip).__name__}")
        self.skip.validate()
        validate_seed(self.seed)
        from stepsaver.shrink.optimize import parse_levers

        parse_levers(self.levers)  # unknown lever: one line listing the levers

    def rule(self) -> dict[str, float]:
        """The keep rule in force: these settings, or optimize's defaults where None."""
        from stepsaver.shrink import optimize as opt

        return {"min_speedup": opt.MIN_SPEEDUP if self.min_speedup is None else float(self.min_speedup),
                "psnr_min": opt.PSNR_MIN if self.psnr_min is None else float(self.psnr_min),
                "lpips_max": opt.LPIPS_MAX if self.lpips_max is None else float(self.lpips_max)}


def cost_per_10k(seconds_per_image: float, cfg: OptimizeBenchConfig) -> dict[str, float]:
    """Dollars and grams of CO2 per 10,000 images at ``seconds_per_image`` (:data:`COST_FORMULA`).

    Reuses :class:`stepsaver.measure.cost.CostModel` (its "GPU hour" is any machine's hour).
    """
    from stepsaver.measure.cost import CostModel

    model = CostModel(price_per_gpu_hour=cfg.price_per_hour, power_watts=cfg.power_watts,
                      kg_co2_per_kwh=cfg.grid_g_co2_per_kwh / 1000)
    money = model.per_10k_images(seconds_per_image)
    return {"usd_per_10k": money["usd_per_10k"], "g_co2_per_10k": money["kg_co2_per_10k"] * 1000}


# ---- the pipeline's parts ---------------------------------------------------------------------------
def _denoiser_attr(pipe: Any) -> str:
    from torch import nn

    for name in ("unet", "transformer"):
        if isinstance(getattr(pipe, name, None), nn.Module):
            return name
    raise StepsaverError(f"{type(pipe).__name__} has no `unet` or `transformer` denoiser to benchmark")


def _built(pipe: Any, names: Sequence[str], params: Mapping[str, dict], vae: Mapping[str, bool]) -> tuple[Any, Any]:
    """(denoiser, vae) with ``names`` applied by :func:`apply_levers`; ``pipe`` itself is left as it was.

    apply_levers works on deep copies and installs them; taking them off again gives the parts
    without touching the eager modules the other variants run.
    """
    from stepsaver.shrink.optimize import apply_levers

    dname = _denoiser_attr(pipe)
    denoiser, vae_module = getattr(pipe, dname), getattr(pipe, "vae", None)
    try:
        apply_levers(pipe, list(names), dict(params), dict(vae))
        return getattr(pipe, dname), getattr(pipe, "vae", None)
    finally:
        setattr(pipe, dname, denoiser)
        if vae_module is not None:
            pipe.vae = vae_module


@contextlib.contextmanager
def _variant(pipe: Any, parts: tuple[Any, Any], skip: AdaptiveSkipConfig | None) -> Iterator[None]:
    """``pipe`` runs ``parts`` (and Skip where given) for the block; its own modules are back afterwards."""
    from stepsaver.skip import disable_adaptive_skip, enable_adaptive_skip

    dname = _denoiser_attr(pipe)
    denoiser, vae = getattr(pipe, dname), getattr(pipe, "vae", None)
    setattr(pipe, dname, parts[0])
    if parts[1] is not None:
        pipe.vae = parts[1]
    try:
        if skip is not None:
            enable_adaptive_skip(pipe, skip)
        try:
            yield
        finally:
            if skip is not None:
                disable_adaptive_skip(pipe)
    finally:
        setattr(pipe, dname, denoiser)
        if vae is not None:
            pipe.vae = vae


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")[:300]


# ---- one model ----------------------------------------------------------------------------------------
def _lever_rows(label: str, result: Any, cfg: OptimizeBenchConfig,
                say: Callable[[str], None]) -> list[dict[str, Any]]:
    """One row per lever and one for the combination: optimize's verdict and its latency at each batch size.

    optimize itself timed every lever at every ``cfg.batch_sizes`` (interleaved with eager, a call
    captured from a real pipeline call of that batch) and judged it by the worst, so these are
    the measurements that decided keep/drop and the choice, not a second timing.
    """
    records = [*result.levers, *([result.combination] if result.combination else [])]
    rows = []
    for record in records:
        names = [record["lever"]] if "lever" in record else list(record["levers"])
        status = record.get("status")
        row: dict[str, Any] = {"model": label, "lever": "+".join(names), "status": status,
                               "chosen": bool(result.chosen) and names == list(result.chosen),
                               "psnr_min": record.get("psnr_min"), "lpips_max": record.get("lpips_max"),
                               "reason": record.get("reason"), "summary": record.get("summary")}
        measurable = status in ("kept", "dropped")
        per = record.get("per_batch") or ({cfg.batch_sizes[0]: record} if measurable else {})
        for b in cfg.batch_sizes:
            m = per.get(b) if measurable else None
            e, c = (m or {}).get("eager_s"), (m or {}).get("latency_s")
            row.update({f"b{b}_eager_ms": None if e is None else e * 1e3,
                        f"b{b}_ms": None if c is None else c * 1e3,
                        f"b{b}_speedup": None if m is None else (e / c if c else math.inf)})
        rows.append(row)
        say(f"{label}: {row['lever']}: {status}"
            + "".join(f", {row[f'b{b}_speedup']:.2f}x at batch {b}" for b in cfg.batch_sizes
                      if row.get(f"b{b}_speedup") is not None))
    return rows


def _quality(images: Sequence[Any], reference: Sequence[Any]) -> tuple[float, float]:
    """Mean PSNR (capped as optimize caps it) and mean LPIPS-Alex of ``images`` vs ``reference``."""
    from stepsaver.measure.lpips import lpips_distance
    from stepsaver.measure.quality import psnr, to_float_nchw
    from stepsaver.shrink.optimize import PSNR_CAP

    x, y = to_float_nchw(list(images)), to_float_nchw(list(reference))
    p = psnr(x, y).clamp(max=PSNR_CAP).nan_to_num(nan=0.0)
    d = lpips_distance(x * 2 - 1, y * 2 - 1).flatten().nan_to_num(nan=1.0)
    return float(p.mean()), float(d.mean())


def _end_to_end(label: str, pipe: Any, result: Any, prompts: Sequence[str], cfg: OptimizeBenchConfig,
                say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Full images at ``cfg.steps``: eager, eager + Skip, chosen, chosen + Skip, interleaved; medians.

    A chosen variant that fails to build or render is reported in its row (``error``), never fatal.
    """
    from stepsaver.generation import generate_images

    dname = _denoiser_attr(pipe)
    eager_parts = (getattr(pipe, dname), None)
    chosen = list(result.chosen)
    variants: dict[str, tuple[tuple[Any, Any], AdaptiveSkipConfig | None]] = {
        "eager": (eager_parts, None), "eager + Skip": (eager_parts, cfg.skip)}
    errors: dict[str, str] = {}
    if chosen:
        try:
            chosen_parts = _built(pipe, chosen, result.params, result.vae)
            variants.update({"chosen": (chosen_parts, None), "chosen + Skip": (chosen_parts, cfg.skip)})
        except Exception as exc:  # reported, never fatal
            errors.update({"chosen": _one_line(exc), "chosen + Skip": _one_line(exc)})
    seeds = [cfg.seed + i for i in range(len(prompts))]

    def render(name: str, i: int) -> Any:
        parts, skip = variants[name]
        with _variant(pipe, parts, skip):
            return generate_images(pipe, [prompts[i]], steps=cfg.steps, seeds=[seeds[i]], guidance=cfg.guidance,
                                   batch_size=1, **cfg.extra_call_kwargs)[0]

    for name in list(variants):  # untimed: graphs built, allocations made, lazy imports paid
        try:
            render(name, 0)
        except Exception as exc:
            if not name.startswith("chosen"):
                raise  # eager (+ Skip) failing is a broken pipeline, not a lever
            errors[name] = _one_line(exc)
            del variants[name]
    names = list(variants)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    calls: dict[str, list[int]] = {n: [] for n in names}
    images: dict[str, list[Any]] = {n: [None] * len(prompts) for n in names}
    turn = 0
    for rep in range(cfg.e2e_repeats):
        for i in range(len(prompts)):
            order = names[turn % len(names):] + names[:turn % len(names)]  # every variant leads in turn
            turn += 1
            for name in order:
                r = render(name, i)
                seconds[name].append(r.seconds)
                if rep == 0:
                    calls[name].append(r.denoiser_calls)
                    images[name][i] = r.images[0]
    eager_median = statistics.median(seconds["eager"])
    rows = []
    for name in VARIANTS:
        row: dict[str, Any] = {"model": label, "variant": name,
                               "levers": "+".join(chosen) if name.startswith("chosen") else "",
                               "skip": name.endswith("Skip")}
        if name in errors:
            row.update(median_s=None, speedup=None, denoiser_calls=None, psnr_db=None, lpips=None,
                       usd_per_10k=None, g_co2_per_10k=None, error=errors[name])
            rows.append(row)
            say(f"{label}: end to end {name}: failed ({errors[name]})")
            continue
        source = name if name in variants else name.replace("chosen", "eager")  # no lever kept: chosen is eager
        median = statistics.median(seconds[source])
        quality = (None, None) if source == "eager" else _quality(images[source], images["eager"])
        row.update(median_s=median, speedup=eager_median / median, denoiser_calls=statistics.mean(calls[source]),
                   psnr_db=quality[0], lpips=quality[1], **cost_per_10k(median, cfg))
        if source != name:
            row["note"] = "no lever kept: chosen is eager fp32 (the eager rows' measurements)"
        rows.append(row)
        say(f"{label}: end to end {name}: {median:.3f} s/image, {row['speedup']:.2f}x")
    return rows


def optimize_verdicts(label: str, lever_rows: Sequence[dict], e2e_rows: Sequence[dict], result: Any,
                      cfg: OptimizeBenchConfig) -> dict[str, Any]:
    """Issue 21's two targets for one model, with a plain held / NOT held line each."""
    chosen = list(result.chosen)
    row = next((r for r in lever_rows if r["chosen"]), None)
    per_batch = {b: (row or {}).get(f"b{b}_speedup") for b in cfg.batch_sizes}
    target = cfg.target_per_iteration
    iter_held = bool(chosen) and all(s is not None and s >= target for s in per_batch.values())
    speeds = ", ".join(f"{s:.2f}x at batch {b}" if s is not None else f"not measured at batch {b}"
                       for b, s in per_batch.items())
    if chosen:
        quality = (f"quality kept (worst PSNR {row['psnr_min']:.1f} dB, worst LPIPS {row['lpips_max']:.4f} on "
                   f"{cfg.n} calibration prompts at {cfg.quality_steps} steps)")
        iter_text = (f"**{label}, per iteration: {'held' if iter_held else 'NOT held'}**: chosen "
                     f"{' + '.join(chosen)} is {speeds} vs the {target:g}x target; {quality}.")
    else:
        iter_text = (f"**{label}, per iteration: NOT held**: no lever was both faster and lossless here, so the "
                     f"chosen setting is eager fp32 (1.00x vs the {target:g}x target).")
    by = {r["variant"]: r for r in e2e_rows}
    both = by["chosen + Skip"]

    def x(r: dict) -> str:
        return f"{r['speedup']:.2f}x" if r.get("speedup") is not None else f"failed ({r.get('error')})"

    e2e_held = both.get("speedup") is not None and both["speedup"] >= cfg.target_end_to_end
    if both.get("speedup") is None:
        detail = f"chosen + Skip failed ({both.get('error')})"
    else:
        detail = (f"{'chosen' if chosen else 'eager'} + Skip is {both['speedup']:.2f}x "
                  f"({by['eager']['median_s']:.3f} s -> {both['median_s']:.3f} s per image, "
                  f"{by['eager']['denoiser_calls']:.0f} -> {both['denoiser_calls']:.1f} denoiser calls)")
    e2e_text = (f"**{label}, end to end at {cfg.steps} steps with Skip: {'held' if e2e_held else 'NOT held'}**: "
                f"{detail} vs the {cfg.target_end_to_end:g}x target; Skip alone {x(by['eager + Skip'])}, "
                f"chosen alone {x(by['chosen'])}.")
    return {"per_iteration": {"held": iter_held, "chosen": chosen, "speedups": per_batch, "target": target,
                              "text": iter_text},
            "end_to_end": {"held": e2e_held, "speedup": both.get("speedup"), "target": cfg.target_end_to_end,
                           "steps": cfg.steps, "text": e2e_text}}


# ---- the report ----------------------------------------------------------------------------------------
def _bar(value: float | None) -> float:
    """A bar's height: missing (failed, unavailable) or non-finite values draw no bar."""
    return value if value is not None and math.isfinite(value) else 0.0


def _plot(out: Path, labels: Sequence[str], lever_rows: Sequence[dict], e2e_rows: Sequence[dict],
          cfg: OptimizeBenchConfig) -> Path:
    """Per model: each lever's per-iteration speedup at each batch size; the end-to-end variants."""
    import numpy as np

    from stepsaver.measure.report import pyplot, save_plot

    plt = pyplot()
    fig, axes = plt.subplots(len(labels), 2, figsize=(13, 3.8 * len(labels)), dpi=120, squeeze=False,
                             gridspec_kw={"width_ratios": [2.2, 1]})
    width = 0.8 / len(cfg.batch_sizes)
    for (left, right), label in zip(axes, labels, strict=True):
        rows = [r for r in lever_rows if r["model"] == label]
        x = np.arange(len(rows))
        for k, b in enumerate(cfg.batch_sizes):
            values = [_bar(r.get(f"b{b}_speedup")) for r in rows]
            left.bar(x + (k - (len(cfg.batch_sizes) - 1) / 2) * width, values, width, label=f"batch {b}")
        left.axhline(1.0, color="grey", lw=0.8)
        left.axhline(cfg.target_per_iteration, color="tab:red", lw=1, ls="--",
                     label=f"target {cfg.target_per_iteration:g}x")
        marks = {"kept": "kept", "dropped": "dropped", "failed": "failed", "unavailable": "n/a"}
        left.set_xticks(x, [f"{r['lever']}\n({marks.get(r['status'], r['status'])}{', chosen' if r['chosen'] else ''})"
                            for r in rows], rotation=30, ha="right", fontsize=7)
        left.set(ylabel="per-iteration speedup vs eager fp32")
        left.set_title(f"{label}: each lever alone and the combination (denoiser call)", fontsize=9)
        left.legend(fontsize=7)
        left.grid(axis="y", alpha=0.3)
        ends = [r for r in e2e_rows if r["model"] == label]
        right.bar(range(len(ends)), [_bar(r.get("speedup")) for r in ends], color=["grey", "tab:blue", "tab:orange",
                                                                         "tab:green"][:len(ends)])
        right.axhline(1.0, color="grey", lw=0.8)
        right.axhline(cfg.target_end_to_end, color="tab:red", lw=1, ls="--",
                      label=f"target {cfg.target_end_to_end:g}x")
        right.set_xticks(range(len(ends)), [r["variant"] for r in ends], rotation=20, ha="right", fontsize=8)
        right.set(ylabel="end-to-end speedup vs eager fp32")
        right.set_title(f"{label}: a full image at {cfg.steps} steps", fontsize=9)
        right.legend(fontsize=7)
        right.grid(axis="y", alpha=0.3)
    return save_plot(fig, out / "optimize.png")


def bench_optimize(cfg: OptimizeBenchConfig | None = None, out_dir: str | Path = "docs/results",
                   pipes: Mapping[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Run issue 21 part 1's benchmark and write ``optimize.{json,md,png}`` under ``out_dir``.

    ``pipes`` (label -> CPU float32 pipeline) replaces loading ``cfg.models``: the run covers
    exactly those labels (tests pass tiny random pipelines). ``progress`` prints one line per
    stage on stderr. Returns the rows, the end-to-end rows, the verdicts and the paths written.
    """
    import torch

    from stepsaver.measure.report import markdown_table, write_report
    from stepsaver.shrink import optimize as opt

    cfg = cfg or OptimizeBenchConfig()
    cfg.validate(need_models=not pipes)
    labels = list(pipes) if pipes else list(cfg.models)
    rule = cfg.rule()
    say: Callable[[str], None] = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda _m: None)
    prompts = opt.default_prompts(cfg.n)
    started = time.perf_counter()
    lever_rows: list[dict] = []
    e2e_rows: list[dict] = []
    targets: dict[str, Any] = {}
    records: dict[str, Any] = {}
    for label in labels:
        t0 = time.perf_counter()
        if pipes:
            pipe = pipes[label]
        else:
            from stepsaver.pipelines import load_pipeline

            say(f"{label}: loading")
            pipe = load_pipeline(label, scheduler=None, device="cpu", dtype=torch.float32)
        bar = dict(getattr(pipe, "_progress_bar_config", {}) or {})
        pipe.set_progress_bar_config(disable=True)
        try:
            result = opt.optimize_pipeline(pipe, prompts, levers=cfg.levers, steps=cfg.quality_steps, seed=cfg.seed,
                                           guidance=cfg.guidance, repeats=cfg.repeats, **rule,
                                           log=lambda m, label=label: say(f"{label}: optimize: {m}"),
                                           batch_sizes=cfg.batch_sizes, **cfg.extra_call_kwargs)
            rows = _lever_rows(label, result, cfg, say)
            ends = _end_to_end(label, pipe, result, prompts[:cfg.e2e_n] if cfg.e2e_n <= len(prompts)
                               else opt.default_prompts(cfg.e2e_n), cfg, say)
        finally:
            pipe._progress_bar_config = bar
        lever_rows += rows
        e2e_rows += ends
        targets[label] = optimize_verdicts(label, rows, ends, result, cfg)
        records[label] = {**result.to_dict(), "bench_seconds": round(time.perf_counter() - t0, 1)}
        if not pipes:
            del pipe
    elapsed = time.perf_counter() - started
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot = _plot(out, labels, lever_rows, e2e_rows, cfg)
    sizes = cfg.batch_sizes
    columns = ["model", "lever", "status", "chosen",
               *[f"b{b}_{k}" for b in sizes for k in ("eager_ms", "ms", "speedup")], "psnr_min", "lpips_max", "reason",
               *(["errors"] if any("errors" in r for r in lever_rows) else [])]
    e2e_columns = ["model", "variant", "levers", "median_s", "speedup", "denoiser_calls", "psnr_db", "lpips",
                   "usd_per_10k", "g_co2_per_10k"]
    verdict_lines = [v[k]["text"] for v in targets.values() for k in ("per_iteration", "end_to_end")]
    summary = "\n".join([
        f"Issue 21 part 1: `stepsaver optimize`'s levers on this machine, each alone and the chosen combination, in "
        f"one run of {elapsed / 60:.1f} min ({torch.get_num_threads()} torch threads). Keep rule (optimize's): "
        f"at least {rule['min_speedup']:g}x faster per iteration at the worst of batch "
        f"{', '.join(str(b) for b in cfg.batch_sizes)} (median of {cfg.repeats} calls each, interleaved with eager "
        f"fp32; one call captured from a real batch-B pipeline call) and every calibration prompt within PSNR >= "
        f"{rule['psnr_min']:g} dB and LPIPS <= {rule['lpips_max']:g} of the eager fp32 image ({cfg.n} "
        f"training-scene captions, {cfg.quality_steps} steps, guidance {cfg.guidance:g}); the chosen setting is "
        f"the kept one with the best worst-batch speedup. Per iteration = one denoiser call (a UNet's CFG "
        f"pair is one call of batch 2B; Flux's true CFG makes two calls of batch B per step). "
        f"End to end: a full image at {cfg.steps} steps, batch 1, {cfg.e2e_n} prompt(s) x "
        f"{cfg.e2e_repeats} repeat(s), every variant in turn, medians; Skip = the default AdaptiveSkipConfig "
        f"(threshold {cfg.skip.threshold:g}, C_max {cfg.skip.max_skips}); PSNR/LPIPS vs the eager image of the "
        f"same prompt and seed.", "",
        "## Targets", "", *[f"- {t}" for t in verdict_lines], "",
        f"## End to end at {cfg.steps} steps", "", markdown_table(e2e_rows, e2e_columns), "",
        f"Cost and CO2: {COST_FORMULA}. Assumed: ${cfg.price_per_hour:g} per hour (a 2-vCPU cloud instance), "
        f"{cfg.power_watts:g} W, {cfg.grid_g_co2_per_kwh:g} gCO2/kWh; all three are options "
        "(`--price`, `--power`, `--intensity`).", "",
        "## Each lever alone and the combination (per iteration, latency in ms)"])
    extra = {"config": asdict(cfg), "keep_rule": rule, "end_to_end": e2e_rows, "targets": targets,
             "cost_formula": COST_FORMULA, "optimize_machine": opt.machine_info(), "optimize": records,
             "seconds": elapsed}
    table = [{k: v for k, v in r.items() if k != "summary"} for r in lever_rows]
    paths = write_report("optimize", finite(table), title="Optimize: a faster denoiser per iteration, on this machine",
                         summary=summary, extra=finite(extra), plots=[plot], out_dir=out, columns=columns)
    return {"rows": finite(table), "end_to_end": finite(e2e_rows), "targets": finite(targets), "seconds": elapsed,
            "json": str(paths["json"]), "md": str(paths["md"]), "plot": str(plot)}
