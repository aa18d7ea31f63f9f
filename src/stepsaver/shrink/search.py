"""``stepsaver shrink search``: a small UNet architecture search under a latency budget (the AutoNAC stand-in).

DeciDiffusion's U-Net-NAS was found by search (AutoNAC): fewer blocks, a variable number of ResNet
and attention blocks per stage, no attention at the highest resolution, more of it in the up path.
This module runs that idea small, on the embedded model: a handful of :class:`Layout` candidates,
each a plain diffusers ``UNet2DConditionModel`` config (so a winner loads into a standard
``StableDiffusionPipeline``; no custom module), is

1. timed per iteration (CFG batch 2 at 16x16, MiniLM-length context), interleaved with the
   baseline (today's layout) so a busy machine slows both alike (:func:`measure_latency`);
2. trained with the same short proxy schedule on the precomputed latents (:func:`train_candidate`,
   through :func:`stepsaver.shrink.train.train_model`, each candidate in its own resumable run
   folder: a killed search continues, a finished candidate is never retrained);
3. scored at 30 DDIM steps on held-out prompts: FID against the real scenes and adherence.

The Pareto set of FID vs latency ratio is reported (:func:`write_search_report`) with the paired
bootstrap CI of the winner (the best FID within the budget) vs the baseline, and the verdict of
the ship rule: >= 1.4x faster per iteration, FID no worse and adherence no worse (CIs).
:func:`train_winner` trains a chosen layout to the full budget afterwards.

What diffusers' per-stage options allow, and so what a layout can say: the down resnets per
stage (``layers_per_block`` tuple; 0 is allowed where a stage keeps its input width, e.g. the
16x16 stage, which is then only the downsampling conv), whether each stage of each path has
cross-attention (the block types, chosen separately for down and up) and how deep its transformers
are (nested ``transformer_layers_per_block`` and ``reverse_transformer_layers_per_block``), the mid
block's attention, and the channel widths. The up path always has one resnet more per stage than
the down path (``layers_per_block + 1``: one per skip connection), which is exactly
DeciDiffusion's published pattern (down resnets [2, 2, 1] -> up [2, 3, 3]); it cannot be set
independently without a custom module.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepsaver.errors import StepsaverError
from stepsaver.shrink.architecture import unet_config
from stepsaver.text import MAX_TOKENS

TARGET_SPEEDUP = 1.4  # the issue's ship rule: >= 1.4x faster per iteration than today's UNet
DEFAULT_BUDGET = round(1 / TARGET_SPEEDUP, 3)  # latency ratio (candidate / baseline): 0.714 = 1.4x faster
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_MAX_DEPTH = 8
_MAX_RESNETS = 4


def _ints(value: Any, what: str, layout: str, low: int, high: int, n: int) -> tuple[int, ...]:
    values = tuple(value) if isinstance(value, list | tuple) else None
    if values is None or len(values) != n:
        raise StepsaverError(f"layout {layout!r}: {what} needs one entry per stage ({n}), got {value!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise StepsaverError(f"layout {layout!r}: {what} entries must be integers in {low}..{high}, got {value!r}")
    return values


@dataclass(frozen=True)
class Layout:
    """One UNet layout. Every per-stage tuple is ordered by resolution, highest first (16x16, 8x8, 4x4).

    * ``resnets``: down-path ResNet blocks per stage; the up path gets one more per stage.
    * ``down_attention`` / ``up_attention``: transformer layers after each ResNet of that stage in
      that path; 0 means no attention there (a plain ``DownBlock2D`` / ``UpBlock2D``).
    * ``mid_attention``: transformer layers of the mid block (0: a ResNet-only ``UNetMidBlock2D``).
      diffusers builds the mid block with the depth of the lowest down stage, so where that stage
      has attention the two must agree.
    * ``channels``: ``block_out_channels`` (default: the embedded model's 64/128/128); multiples of 16.
    """

    name: str
    resnets: tuple[int, ...] = (1, 1, 1)
    down_attention: tuple[int, ...] = (0, 1, 1)
    up_attention: tuple[int, ...] = (0, 1, 1)
    mid_attention: int = 1
    channels: tuple[int, ...] | None = None
    note: str = ""

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.channels) if self.channels is not None else tuple(unet_config()["block_out_channels"])

    @property
    def up_resnets(self) -> tuple[int, ...]:
        """ResNets per up stage (highest resolution first): one per skip connection, so down + 1."""
        return tuple(r + 1 for r in self.resnets)

    def validate(self) -> Layout:
        """Raise :class:`StepsaverError` naming the problem; returns the layout when it builds."""
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise StepsaverError(f"layout name {self.name!r} must be lower-case letters, digits, '-' or '_' "
                                 "(it names the candidate's run folder)")
        base = unet_config()
        widths = self.widths
        if not 2 <= len(widths) <= 4:
            raise StepsaverError(f"layout {self.name!r}: 2 to 4 stages (16x16 down to 2x2), got {len(widths)} channels")
        groups = base["norm_num_groups"]
        for c in widths:
            if isinstance(c, bool) or not isinstance(c, int) or c <= 0 or c % groups or c > 1024:
                raise StepsaverError(f"layout {self.name!r}: channels must be positive multiples of {groups} "
                                     f"(GroupNorm groups) up to 1024, got {list(widths)}")
        n = len(widths)
        resnets = _ints(self.resnets, "resnets", self.name, 0, _MAX_RESNETS, n)
        down = _ints(self.down_attention, "down_attention", self.name, 0, _MAX_DEPTH, n)
        up = _ints(self.up_attention, "up_attention", self.name, 0, _MAX_DEPTH, n)
        mid = self.mid_attention
        if isinstance(mid, bool) or not isinstance(mid, int) or not 0 <= mid <= _MAX_DEPTH:
            raise StepsaverError(f"layout {self.name!r}: mid_attention must be an integer in 0..{_MAX_DEPTH}, "
                                 f"got {mid!r}")
        for i, r in enumerate(resnets):
            if r == 0 and down[i]:
                raise StepsaverError(f"layout {self.name!r}: stage {i} has no resnet, so it has nowhere to put "
                                     f"down_attention {down[i]}; give it a resnet or set its attention to 0")
            if r == 0 and widths[max(i - 1, 0)] != widths[i]:
                raise StepsaverError(f"layout {self.name!r}: stage {i} changes width {widths[max(i - 1, 0)]} -> "
                                     f"{widths[i]}, which needs at least one resnet there")
        if down[-1] and mid and down[-1] != mid:
            raise StepsaverError(f"layout {self.name!r}: mid_attention {mid} must equal the lowest stage's "
                                 f"down_attention {down[-1]} (diffusers builds the mid block with that depth), or be 0")
        if not any(down) and not any(up) and not mid:
            raise StepsaverError(f"layout {self.name!r}: no cross-attention anywhere, so the UNet would ignore "
                                 "the prompt; give at least one stage or the mid block attention")
        return self

    def unet_config(self) -> dict[str, Any]:
        """A full ``UNet2DConditionModel`` config: the embedded model's, with this layout's stages.

        Uniform depths keep diffusers' plain integers (the baseline gives exactly
        :func:`~stepsaver.shrink.architecture.unet_config`); mixed depths use the nested per-layer
        form with ``reverse_transformer_layers_per_block`` for the up path.
        """
        self.validate()
        cfg = dict(unet_config())
        resnets, down, up, mid = tuple(self.resnets), tuple(self.down_attention), tuple(self.up_attention), \
            self.mid_attention
        cfg["block_out_channels"] = self.widths
        cfg["down_block_types"] = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down)
        cfg["up_block_types"] = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(up))
        cfg["layers_per_block"] = resnets[0] if len(set(resnets)) == 1 else resnets
        if not mid:
            cfg["mid_block_type"] = "UNetMidBlock2D"
        depths = {a for a in (*down, *up, mid) if a}
        if len(depths) <= 1:
            depth = depths.pop() if depths else 1
            if depth != 1:
                cfg["transformer_layers_per_block"] = depth
        else:
            fill = [1] * len(resnets)
            fill[-1] = mid or 1  # the mid block reads its depth from the lowest down stage's entry
            cfg["transformer_layers_per_block"] = tuple((a or fill[i],) * r for i, (a, r) in
                                                        enumerate(zip(down, resnets, strict=True)))
            cfg["reverse_transformer_layers_per_block"] = tuple(
                (up[i] or 1,) * (resnets[i] + 1) for i in reversed(range(len(resnets))))
        return cfg

    def build(self, seed: int | None = None):
        """A randomly initialised ``UNet2DConditionModel`` of this layout (seeded when ``seed`` is given)."""
        from diffusers import UNet2DConditionModel

        if seed is not None:
            torch.manual_seed(seed)
        return UNet2DConditionModel(**self.unet_config())

    def params(self) -> int:
        """Parameter count (built on the meta device: no memory, no initialisation)."""
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            model = UNet2DConditionModel(**self.unet_config())
        return sum(p.numel() for p in model.parameters())

    def stages(self) -> dict[str, str]:
        """The layout as short per-stage strings (highest resolution first), for tables."""
        def s(values: Sequence[int]) -> str:
            return "/".join(map(str, values))

        return {"resnets": s(self.resnets), "resnets_up": s(self.up_resnets), "attn_down": s(self.down_attention),
                "attn_up": s(self.up_attention), "attn_mid": str(self.mid_attention), "channels": s(self.widths)}

    def describe(self) -> str:
        st = self.stages()
        return (f"res {st['resnets']} (up {st['resnets_up']}), attn down {st['attn_down']} up {st['attn_up']} "
                f"mid {st['attn_mid']}, ch {st['channels']}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.widths)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layout:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("resnets", "down_attention", "up_attention", "channels"):
            if isinstance(known.get(k), list):
                known[k] = tuple(known[k])
        return cls(**known).validate()


BASELINE = Layout("baseline", note="today's embedded UNet: 1 resnet per level, attention at 8x8 and 4x4")

CANDIDATES: tuple[Layout, ...] = (
    BASELINE,
    Layout("attn-low", down_attention=(0, 0, 1), up_attention=(0, 0, 1),
           note="attention only at the lowest resolution (4x4) and in the mid block"),
    Layout("attn-up", down_attention=(0, 0, 1), up_attention=(0, 0, 2),
           note="DeciDiffusion's shape: no attention at high resolution, the up path's deeper (2 layers at 4x4)"),
    Layout("skip-high", resnets=(0, 1, 1),
           note="fewer resnets at high resolution: the 16x16 down stage is only its downsampling conv"),
    Layout("narrow-high", channels=(32, 128, 128),
           note="the 16x16 stage at 32 channels (full-resolution convolutions dominate CPU time)"),
    Layout("two-level", resnets=(1, 2), down_attention=(0, 1), up_attention=(0, 1), channels=(64, 128),
           note="fewer blocks: two levels (16x16, 8x8), 2 resnets and attention at 8x8"),
    Layout("lean-skip", resnets=(0, 1, 1), down_attention=(0, 0, 1), up_attention=(0, 0, 1),
           note="skip-high and attn-low together"),
    Layout("lean-narrow", down_attention=(0, 0, 1), up_attention=(0, 0, 1), channels=(32, 128, 128),
           note="narrow-high and attn-low together"),
    Layout("minimal", down_attention=(0, 0, 1), up_attention=(0, 0, 1), mid_attention=0, channels=(32, 128, 128),
           note="lean-narrow without mid-block attention: the cheapest"),
)


def candidates(names: Sequence[str] | None = None, include_baseline: bool = True) -> list[Layout]:
    """The default candidates (DeciDiffusion's levers, today's layout as the baseline), or the named ones.

    Unknown names are a one-line error listing the known ones. The baseline is always first
    (added when ``names`` leaves it out and ``include_baseline``): every ratio is against it.
    """
    by_name = {c.name: c for c in CANDIDATES}
    if names is None:
        chosen = list(CANDIDATES)
    else:
        names = [n.strip() for n in names if n.strip()]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise StepsaverError(f"unknown candidate {', '.join(map(repr, unknown))}; "
                                 f"choose from: {', '.join(by_name)}")
        if not names:
            raise StepsaverError(f"no candidates named; choose from: {', '.join(by_name)}")
        chosen = [by_name[n] for n in dict.fromkeys(names)]
    if include_baseline and BASELINE.name not in {c.name for c in chosen}:
        chosen.insert(0, BASELINE)
    chosen.sort(key=lambda c: c.name != BASELINE.name)
    return [c.validate() for c in chosen]


def parse_candidates(text: str | None) -> list[Layout]:
    """``"attn-low,lean"`` -> those layouts with the baseline first; None or "all": every default."""
    if text is None or text.strip() in ("", "all"):
        return candidates()
    return candidates(text.split(","))


# ---- latency -------------------------------------------------------------------------------------

class _LatencyBench:
    """A CFG-sized denoiser call (batch ``batch`` at the layout's sample size, MiniLM-length context)
    timed interleaved with the baseline's: baseline, candidate, candidate, baseline, ..."""

    def __init__(self, baseline: Layout, batch: int, seed: int):
        from stepsaver.text import TEXT_DIM

        cfg = baseline.unet_config()
        gen = torch.Generator().manual_seed(seed)
        size = cfg["sample_size"]
        self.inputs = (torch.randn(batch, cfg["in_channels"], size, size, generator=gen),
                       torch.full((batch,), 500, dtype=torch.long),
                       torch.randn(batch, MAX_TOKENS, TEXT_DIM, generator=gen))
        self.baseline = baseline.build(seed).eval()
        self.seed = seed

    def call(self, model) -> Callable[[], Any]:
        sample, t, context = self.inputs

        def run() -> Any:
            with torch.inference_mode():
                return model(sample, t, context, return_dict=False)[0]
        return run

    def pair(self, layout: Layout, repeats: int, warmup: int) -> tuple[float, float]:
        model = layout.build(self.seed).eval()
        base, cand = self.call(self.baseline), self.call(model)
        for _ in range(warmup):
            base()
            cand()
        times: dict[bool, list[float]] = {True: [], False: []}
        for i in range(repeats):
            for is_base in ((True, False) if i % 2 == 0 else (False, True)):
                fn = base if is_base else cand
                t0 = time.perf_counter()
                fn()
                times[is_base].append(time.perf_counter() - t0)
        return statistics.median(times[True]), statistics.median(times[False])


def _check_timing(batch: int, repeats: int, warmup: int) -> None:
    if batch < 1 or repeats < 1 or warmup < 0:
        raise StepsaverError(f"latency needs batch >= 1, repeats >= 1 and warmup >= 0, got batch {batch}, "
                             f"repeats {repeats}, warmup {warmup}")


def _latency_row(layout: Layout, base_s: float, cand_s: float, batch: int, repeats: int) -> dict[str, Any]:
    ratio = cand_s / base_s
    return {"candidate": layout.name, "layout": layout.describe(), **layout.stages(), "params": layout.params(),
            "latency_ms": 1000 * cand_s, "baseline_ms": 1000 * base_s, "latency_ratio": ratio,
            "speedup": 1 / ratio, "batch": batch, "repeats": repeats}


def measure_latency(layout: Layout, batch: int = 2, repeats: int = 20, warmup: int = 2,
                    baseline: Layout = BASELINE, seed: int = 0) -> dict[str, Any]:
    """Median per-iteration latency of a random UNet of ``layout``, interleaved with ``baseline``.

    Batch 2 is one classifier-free-guidance call at 16x16. Returns ``latency_ms``,
    ``baseline_ms``, ``latency_ratio`` (candidate / baseline: < 1 is faster) and ``speedup``.
    Uses torch's current thread count (set ``OMP_NUM_THREADS`` or ``torch.set_num_threads``).
    """
    _check_timing(batch, repeats, warmup)
    layout.validate()
    bench = _LatencyBench(baseline.validate(), batch, seed)
    base_s, cand_s = bench.pair(layout, repeats, warmup)
    return _latency_row(layout, base_s, cand_s, batch, repeats)


def measure_latencies(layouts: Sequence[Layout], batch: int = 2, repeats: int = 20, warmup: int = 2,
                      seed: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """:func:`measure_latency` for every layout against the first (the baseline, ratio 1 by definition)."""
    from rich.progress import Progress

    _check_timing(batch, repeats, warmup)
    if not layouts:
        raise StepsaverError("no candidates to measure")
    baseline = layouts[0].validate()
    bench = _LatencyBench(baseline, batch, seed)
    rows = []
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("latency", total=len(layouts))
        for layout in layouts:
            if layout is baseline:  # its own pairing would only measure noise: take its median from a pair
                base_s, _ = bench.pair(baseline, repeats, warmup)
                rows.append(_latency_row(layout, base_s, base_s, batch, repeats))
            else:
                rows.append(_latency_row(layout, *bench.pair(layout.validate(), repeats, warmup), batch, repeats))
            bar.advance(task)
    return rows


def budget_check(rows: Sequence[dict[str, Any]], budget: float, baseline: str = BASELINE.name) -> dict[str, Any]:
    """Which candidates (baseline aside) meet the latency budget, and which came closest when none does."""
    if not budget > 0:
        raise StepsaverError(f"--budget is a latency ratio (candidate / baseline) and must be > 0, got {budget}")
    others = [r for r in rows if r["candidate"] != baseline]
    meets = [r["candidate"] for r in others if r["latency_ratio"] <= budget]
    closest = min(others, key=lambda r: r["latency_ratio"]) if others else None
    if meets:
        note = (f"{len(meets)} of {len(others)} candidates meet the latency budget {budget:.3f} "
                f"({1 / budget:.2f}x faster): {', '.join(meets)}")
    elif closest is None:
        note = "no candidate besides the baseline; add candidates"
    else:
        note = (f"no candidate meets the latency budget {budget:.3f} ({1 / budget:.2f}x faster than the baseline); "
                f"closest: {closest['candidate']} at {closest['latency_ratio']:.3f} ({closest['speedup']:.2f}x); "
                "raise --budget or add faster candidates")
    return {"budget": budget, "meets": meets, "closest": None if closest is None else closest["candidate"],
            "note": note}


# ---- training ------------------------------------------------------------------------------------

def default_base(**overrides: Any):
    """The search's training settings: the shipped model's autoencoder and scene set, the recipe's defaults."""
    from stepsaver.pipelines import EMBEDDED_DIR
    from stepsaver.shrink.train import TrainConfig

    return TrainConfig(**{"vae": str(EMBEDDED_DIR / "vae"), "out": "runs/search", **overrides})


_RUN_KEYS = ("steps", "batch_size", "scenes", "lr", "warmup", "cfg_dropout", "ema_decay", "ema_fraction",
             "min_snr_gamma", "recipe", "seed", "scene_seed", "vae")


def _run_meta(layout: Layout, cfg: Any) -> dict[str, Any]:
    return {"layout": layout.to_dict(), "unet_config": json.loads(json.dumps(layout.unet_config())),
            "train": {k: str(Path(cfg.vae).resolve()) if k == "vae" else getattr(cfg, k) for k in _RUN_KEYS}}


def _write_init(layout: Layout, folder: Path, seed: int) -> Path:
    """The randomly initialised UNet a candidate starts from (as ``train_model`` would seed its own)."""
    if (folder / "config.json").exists():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    layout.build(seed).save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def train_candidate(layout: Layout, base: Any, run_dir: str | Path, steps: int, progress: bool = True,
                    max_minutes: float | None = None) -> dict[str, Any]:
    """Train ``layout`` for ``steps`` with ``base``'s settings in ``run_dir``; resumable, never retrained.

    The UNet starts from a seeded random init written to ``run_dir/init-unet`` (``train_model``'s
    ``init_from``), so the loop, checkpoints, EMA and export are exactly the embedded model's. A
    finished run (``summary.json`` and ``pipeline/``) is returned as it is; a run folder made for
    another layout or other training settings is refused rather than mixed.
    """
    from stepsaver.shrink.train import train_model

    layout.validate()
    if steps <= 0:
        raise StepsaverError(f"training steps must be positive, got {steps}")
    run = Path(run_dir)
    cfg = replace(base, out=str(run), steps=steps, init_from=str(run / "init-unet"))
    meta = _run_meta(layout, cfg)
    meta_file = run / "search_run.json"
    if meta_file.exists():
        old = json.loads(meta_file.read_text())
        if old.get("unet_config") != meta["unet_config"]:
            raise StepsaverError(f"{run} holds a run of another layout ({old.get('layout', {}).get('name')!r}), not "
                                 f"{layout.name!r}; pass another --out or delete that folder")
        if old.get("train") != meta["train"]:
            diff = ", ".join(f"{k} {old.get('train', {}).get(k)} -> {v}" for k, v in meta["train"].items()
                             if old.get("train", {}).get(k) != v)
            raise StepsaverError(f"{run} holds a run of {layout.name!r} with other training settings ({diff}); "
                                 "pass another --out or delete that folder")
    summary_file = run / "summary.json"
    if summary_file.exists() and (run / "pipeline" / "model_index.json").exists():
        summary = json.loads(summary_file.read_text())
        if summary.get("finished"):
            return {**summary, "trained_now": False}
    replace(cfg, init_from=None).validate()  # before anything is written: a missing autoencoder is one line
    run.mkdir(parents=True, exist_ok=True)
    meta_file.write_text(json.dumps(meta, indent=2))
    _write_init(layout, run / "init-unet", cfg.seed)
    summary = train_model(cfg, resume=True, progress=progress, max_minutes=max_minutes)
    summary.pop("history", None)
    return {**summary, "trained_now": True}


def train_winner(layout: Layout | str, *, base: Any = None, out: str | Path = "runs/search-winner",
                 steps: int = 6500, progress: bool = True, max_minutes: float | None = None) -> dict[str, Any]:
    """Train a layout (a :class:`Layout` or a candidate's name) to the full budget (default: v1's 6,500 steps).

    Resumable like every run. The exported ``out/pipeline`` is a standard diffusers folder: compare it
    with the shipped model (``stepsaver bench models -p tiny=... -p new=out/pipeline``) before shipping.
    """
    if isinstance(layout, str):
        layout = candidates([layout], include_baseline=False)[0]
    summary = train_candidate(layout, base if base is not None else default_base(), out, steps,
                              progress=progress, max_minutes=max_minutes)
    if not summary.get("finished"):
        raise StepsaverError(f"{layout.name} stopped at step {summary['steps']} of {steps}; run again to continue")
    return summary


# ---- evaluation ----------------------------------------------------------------------------------

def _evaluate(pipe_dir: str | Path, cache_file: Path, prompts: Sequence[str], scenes: Sequence[Any], steps: int,
              batch: int, seed: int, guidance: float, scorer: Any) -> tuple[torch.Tensor, np.ndarray]:
    """Inception features and per-image adherence of a pipeline on the prompts (cached next to the run)."""
    from stepsaver.bench.heldout import render_set
    from stepsaver.measure.fid import features
    from stepsaver.pipelines import load_pipeline

    if cache_file.exists():
        saved = torch.load(cache_file, weights_only=False)
        return saved["features"], np.asarray(saved["adherence"])
    pipe = load_pipeline(pipe_dir, scheduler=None, device="auto")
    images = render_set(pipe, prompts, steps, batch, seed, guidance)
    feats = features(images)
    adherence = scorer.score(images, list(scenes)).adherence
    tmp = cache_file.with_suffix(".tmp")
    torch.save({"features": feats, "adherence": np.asarray(adherence)}, tmp)
    tmp.replace(cache_file)
    return feats, np.asarray(adherence)


def _folder_digest(folder: str | Path) -> str:
    """SHA-256 of a folder's file names and bytes (the autoencoder a run trained on, wherever it lives)."""
    import hashlib

    digest = hashlib.sha256()
    root = Path(folder)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(root)).encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()


class Ledger:
    """Finished candidates' scores, committed beside the report, so a search spans sessions.

    Why: a candidate costs ~20 CPU minutes to train and score and the whole search hours, more
    than one session; run folders (checkpoints, pipelines) are too big to commit, but what the
    report needs of a finished candidate is small: its Inception features (float16, ~0.8 MB at
    200 prompts), per-image adherence and training summary. One ``<name>-<key>.npz`` + ``.json``
    per candidate, the key a hash of its UNet config, its training settings (the autoencoder by
    content, not path) and the scoring settings, so another schedule or layout never reads it.
    The ``.json`` is written last and marks the entry complete; both are written atomically.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @staticmethod
    def key(layout: Layout, cfg: Any, scoring: dict[str, Any]) -> str:
        import hashlib

        meta = _run_meta(layout, cfg)
        meta["train"]["vae"] = _folder_digest(cfg.vae)
        blob = json.dumps({**meta, "scoring": scoring}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _paths(self, name: str, key: str) -> tuple[Path, Path]:
        base = self.root / f"{name}-{key}"
        return base.with_suffix(".json"), base.with_suffix(".npz")

    def get(self, name: str, key: str) -> tuple[dict[str, Any], torch.Tensor, np.ndarray] | None:
        meta_path, arrays_path = self._paths(name, key)
        try:
            meta = json.loads(meta_path.read_text())
            with np.load(arrays_path) as z:
                feats, adherence = torch.from_numpy(z["features"].astype(np.float32)), z["adherence"].astype(float)
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            return None  # absent or torn: train and score it again
        return meta, feats, adherence

    def put(self, name: str, key: str, layout: Layout, training: dict[str, Any], feats: torch.Tensor,
            adherence: np.ndarray, scoring: dict[str, Any]) -> None:
        from stepsaver.files import write_atomically

        self.root.mkdir(parents=True, exist_ok=True)
        meta_path, arrays_path = self._paths(name, key)

        def arrays(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, features=feats.numpy().astype(np.float16),
                                    adherence=np.asarray(adherence, dtype=np.float32))
        write_atomically(arrays_path, arrays)
        keep = {k: v for k, v in training.items() if k not in ("history", "pipeline", "trained_now")}
        meta = {"candidate": name, "layout": layout.to_dict(), "training": keep, "scoring": scoring,
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch_threads": torch.get_num_threads()}
        write_atomically(meta_path, lambda tmp: tmp.write_text(json.dumps(meta, indent=1, default=str)))


def _as_stored(feats: torch.Tensor) -> torch.Tensor:
    """Features as the ledger keeps them (float16), so FID never depends on whether an entry was reused."""
    return feats.float().to(torch.float16).to(torch.float32)


def paired_mean_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 100, seed: int = 0) -> dict[str, float]:
    """Mean of ``a - b`` over paired rows with a bootstrap 95% CI (prompts resampled)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (max(n_boot, 1), len(d)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"diff": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi), "n_boot": n_boot, "paired": True}


def pareto(rows: Sequence[dict[str, Any]], x: str = "latency_ratio", y: str = "fid") -> list[str]:
    """Candidates no other beats on both ``x`` and ``y`` (lower is better for both), fastest first."""
    front = [r for r in rows if not any(o[x] <= r[x] and o[y] <= r[y] and (o[x] < r[x] or o[y] < r[y])
                                        for o in rows)]
    return [r["candidate"] for r in sorted(front, key=lambda r: r[x])]


def ship_verdict(winner: dict[str, Any], fid_ci: dict[str, float], adh_ci: dict[str, float],
                 target: float = TARGET_SPEEDUP) -> dict[str, Any]:
    """The issue's rule: >= ``target``x faster, FID no worse (CI of the difference reaches 0 or below),
    adherence no worse (CI reaches 0 or above). All three or it is not shipped."""
    fast = winner["speedup"] >= target
    fid_ok = fid_ci["ci_low"] <= 0
    adh_ok = adh_ci["ci_high"] >= 0
    return {"candidate": winner["candidate"], "faster": fast, "fid_no_worse": fid_ok, "adherence_no_worse": adh_ok,
            "ship": fast and fid_ok and adh_ok, "target_speedup": target}


def search(base: Any = None, *, out_dir: str | Path = "runs/search", layouts: Sequence[Layout] | None = None,
           proxy_steps: int = 1000, budget: float = DEFAULT_BUDGET, n: int = 200, steps: int = 30,
           guidance: float = 5.0, seed: int = 0, scene_seed: int = 2, eval_batch: int = 32,
           latency_batch: int = 2, latency_repeats: int = 20, latency_warmup: int = 2, n_boot: int = 100,
           results_dir: str | Path | None = "docs/results", name: str = "architecture", progress: bool = True,
           max_minutes: float | None = None, ledger_dir: str | Path | None = None) -> dict[str, Any]:
    """Time, train (proxy schedule), score and report every candidate; returns rows, Pareto set, winner, verdict.

    ``base`` is a :class:`~stepsaver.shrink.train.TrainConfig` with the data and optimiser settings
    (default :func:`default_base`); its ``steps`` are replaced by ``proxy_steps`` for every
    candidate, so all train the same schedule. Latency comes first (cheap): a budget no candidate
    meets is a one-line error naming the closest before any training starts. Each candidate trains
    in ``out_dir/<name>`` and caches its scores there, so a killed search continues where it
    stopped and a finished candidate is neither retrained nor re-rendered. ``max_minutes`` bounds
    this call's training (the search then stops, resumable). ``results_dir=None`` writes no report.
    ``ledger_dir`` (the CLI's default: ``docs/results/architecture-ledger``, meant to be committed)
    keeps each finished candidate's scores (:class:`Ledger`): a candidate found there is neither
    trained nor rendered, even when its run folder is gone, so a search spans sessions one
    candidate at a time. Each candidate is trained and scored before the next starts.
    """
    from rich.console import Console

    from stepsaver.bench.heldout import heldout_set
    from stepsaver.generation import MAX_STEPS
    from stepsaver.measure.adherence import AdherenceScorer
    from stepsaver.measure.fid import fid_from_features
    from stepsaver.measure.report import bootstrap_fid_difference

    if n < 2:
        raise StepsaverError(f"--n must be >= 2 (FID needs a set), got {n}")
    if not 1 <= steps <= MAX_STEPS:
        raise StepsaverError(f"--steps must be in 1..{MAX_STEPS}, got {steps}")
    if proxy_steps <= 0:
        raise StepsaverError(f"--proxy-steps must be positive, got {proxy_steps}")
    if eval_batch < 1 or n_boot < 1:
        raise StepsaverError("eval batch and bootstrap replicates must be >= 1")
    base = base if base is not None else default_base()
    layouts = list(layouts) if layouts is not None else candidates()
    if BASELINE.name not in {c.name for c in layouts}:
        layouts.insert(0, BASELINE)
    layouts.sort(key=lambda c: c.name != BASELINE.name)  # every ratio and CI is against the baseline
    names = [c.name for c in layouts]
    if len(set(names)) != len(names):
        raise StepsaverError(f"candidate names must be unique, got {names}")
    for c in layouts:
        c.validate()
    replace(base, steps=proxy_steps, out=str(Path(out_dir) / layouts[0].name)).validate()
    console = Console(stderr=True, quiet=not progress)
    out = Path(out_dir)

    console.print(f"[bold]search[/bold]: {len(layouts)} candidates, latency at batch {latency_batch} "
                  f"({torch.get_num_threads()} threads)")
    lat = measure_latencies(layouts, batch=latency_batch, repeats=latency_repeats, warmup=latency_warmup,
                            seed=seed, progress=progress)
    check = budget_check(lat, budget)
    if not check["meets"]:
        raise StepsaverError(check["note"])
    console.print(check["note"])

    t0 = time.time()
    trained: dict[str, dict] = {}
    feats: dict[str, torch.Tensor] = {}
    adh: dict[str, np.ndarray] = {}
    ledger = Ledger(ledger_dir) if ledger_dir is not None else None
    scoring = {"n": n, "steps": steps, "guidance": guidance, "seed": seed, "scene_seed": scene_seed}
    key = f"eval-n{n}-steps{steps}-g{guidance:g}-seed{seed}-ss{scene_seed}.pt"
    heldout: tuple[Any, ...] | None = None
    scorer = None
    for i, layout in enumerate(layouts, 1):
        entry_key = Ledger.key(layout, replace(base, steps=proxy_steps), scoring) if ledger is not None else ""
        found = ledger.get(layout.name, entry_key) if ledger is not None else None
        if found is not None:
            meta, feats[layout.name], adh[layout.name] = found
            trained[layout.name] = {**meta["training"], "trained_now": False, "from_ledger": True}
            console.print(f"[{i}/{len(layouts)}] {layout.name}: scores from the ledger ({meta['date']})")
            continue
        left = None if max_minutes is None else max_minutes - (time.time() - t0) / 60
        if left is not None and left <= 0:
            raise StepsaverError(f"--max-minutes reached before {layout.name}; run the same command again to continue")
        console.print(f"[{i}/{len(layouts)}] {layout.name}: {layout.describe()}, {proxy_steps} proxy steps")
        summary = train_candidate(layout, base, out / layout.name, proxy_steps, progress=progress, max_minutes=left)
        if not summary.get("finished"):
            raise StepsaverError(f"{layout.name} stopped at step {summary['steps']} of {proxy_steps} (--max-minutes); "
                                 "run the same command again to continue")
        if not summary["trained_now"]:
            console.print(f"  {layout.name}: already trained, reused")
        trained[layout.name] = summary
        if heldout is None:
            heldout, scorer = heldout_set(n, scene_seed), AdherenceScorer.load()
        scenes, prompts = heldout[0], heldout[1]
        console.print(f"  scoring {layout.name} ({n} prompts, {steps} steps)")
        f, a = _evaluate(summary["pipeline"], out / layout.name / key, prompts, scenes, steps, eval_batch, seed,
                         guidance, scorer)
        feats[layout.name], adh[layout.name] = _as_stored(f), a
        if ledger is not None:
            ledger.put(layout.name, entry_key, layout, summary, f, a, scoring)
    real_f = (heldout if heldout is not None else heldout_set(n, scene_seed))[3]
    rows = []
    for r in lat:
        c = r["candidate"]
        rows.append({**r, "fid": fid_from_features(real_f, feats[c]), "adherence": float(adh[c].mean()),
                     "final_loss": trained[c].get("final_loss"), "in_budget": r["latency_ratio"] <= budget})
    front = pareto(rows)
    for r in rows:
        r["pareto"] = r["candidate"] in front
    inside = [r for r in rows if r["candidate"] in check["meets"]]
    winner = min(inside, key=lambda r: (r["fid"], -r["adherence"]))
    fid_ci = bootstrap_fid_difference(real_f, feats[winner["candidate"]], feats[BASELINE.name], n_boot=n_boot,
                                      paired=True)
    adh_ci = paired_mean_ci(adh[winner["candidate"]], adh[BASELINE.name], n_boot=n_boot, seed=seed)
    result = {"rows": rows, "pareto": front, "budget": check, "winner": winner["candidate"],
              "bootstrap_fid": fid_ci, "bootstrap_adherence": adh_ci,
              "verdict": ship_verdict(winner, fid_ci, adh_ci),
              "layouts": {c.name: {**c.to_dict(), "unet_config": json.loads(json.dumps(c.unet_config()))}
                          for c in layouts},
              "settings": {"proxy_steps": proxy_steps, "batch_size": base.batch_size, "scenes": base.scenes,
                           "lr": base.lr, "warmup": base.warmup, "recipe": base.recipe, "vae": base.vae,
                           "n": n, "steps": steps, "guidance": guidance, "seed": seed, "scene_seed": scene_seed,
                           "latency_batch": latency_batch, "latency_repeats": latency_repeats,
                           "torch_threads": torch.get_num_threads(), "n_boot": n_boot, "out_dir": str(out)},
              "training": trained}
    if results_dir is not None:
        result.update({k: str(v) for k, v in write_search_report(result, results_dir, name).items()})
    return result


# ---- report --------------------------------------------------------------------------------------

def verdict_text(result: dict[str, Any]) -> str:
    """The ship rule and whether the winner passed it, in plain words."""
    v, fid, adh = result["verdict"], result["bootstrap_fid"], result["bootstrap_adherence"]
    row = next(r for r in result["rows"] if r["candidate"] == v["candidate"])

    def word(ok: bool) -> str:
        return "met" if ok else "NOT met"

    c = v["candidate"]
    failed = [what for ok, what in ((v["faster"], f"not {v['target_speedup']}x faster"),
                                    (v["fid_no_worse"], "FID worse"), (v["adherence_no_worse"], "adherence worse"))
              if not ok]
    head = (f"**Verdict: {c} passes the ship rule at the proxy schedule**; ship it as the new default only if it "
            "still holds once trained to the full budget" if v["ship"]
            else f"**Verdict: do not ship {c}** ({', '.join(failed)})")
    return (f"{head}. The rule: ship a searched UNet only if it is >= {v['target_speedup']}x faster per iteration "
            "than the baseline, with FID no worse (the paired bootstrap 95% CI of FID(winner) - FID(baseline) reaches "
            "0 or below) and adherence no worse (the CI of the mean paired adherence difference reaches 0 or above). "
            f"{c}: {row['speedup']:.2f}x faster ({word(v['faster'])}); FID {fid['fid_diff']:+.2f} "
            f"[{fid['ci_low']:+.2f}, {fid['ci_high']:+.2f}] ({word(v['fid_no_worse'])}); adherence "
            f"{adh['diff']:+.3f} [{adh['ci_low']:+.3f}, {adh['ci_high']:+.3f}] ({word(v['adherence_no_worse'])}).")


def write_search_report(result: dict[str, Any], out_dir: str | Path = "docs/results",
                        name: str = "architecture") -> dict[str, Path]:
    """``<name>.{md,json,png}``: the candidates' table, the Pareto plot (FID and adherence vs latency
    ratio), the winner's paired bootstrap CIs vs the baseline and the ship verdict, and the machine."""
    from stepsaver.measure.report import pyplot, save_plot, write_report

    rows, s, check = result["rows"], result["settings"], result["budget"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    x = [r["latency_ratio"] for r in rows]
    dots = ax[0].scatter(x, [r["fid"] for r in rows], c=[r["adherence"] for r in rows], cmap="viridis", s=45,
                         zorder=3)
    fig.colorbar(dots, ax=ax[0], label="adherence")
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["latency_ratio"])
    ax[0].plot([r["latency_ratio"] for r in front], [r["fid"] for r in front], "k--", lw=0.8, label="Pareto set")
    ax[1].scatter(x, [r["adherence"] for r in rows], s=45, zorder=3)
    for r in rows:
        for a, key in ((ax[0], "fid"), (ax[1], "adherence")):
            a.annotate(r["candidate"], (r["latency_ratio"], r[key]), fontsize=7, xytext=(3, 3),
                       textcoords="offset points", weight="bold" if r["candidate"] == result["winner"] else None)
    for a in ax:
        a.axvline(check["budget"], color="gray", ls=":", lw=0.8, label=f"budget {check['budget']:.3f}")
        a.axvline(1.0, color="gray", lw=0.5)
        a.set_xlabel("latency ratio vs baseline (per iteration, lower = faster)")
        a.grid(alpha=0.3)
        a.margins(x=0.15)
        a.legend(fontsize=7)
    ax[0].set_ylabel(f"FID vs real scenes @ {s['steps']} steps")
    ax[1].set_ylabel("adherence")
    plot = save_plot(fig, out / f"{name}.png")
    table = [{"candidate": r["candidate"], "layout": r["layout"], "params (M)": r["params"] / 1e6,
              "latency (ms)": r["latency_ms"], "ratio": r["latency_ratio"], "speedup": r["speedup"],
              "FID": r["fid"], "adherence": r["adherence"], "Pareto": "yes" if r["pareto"] else "",
              "in budget": "yes" if r["in_budget"] else ""} for r in rows]
    summary = (f"{len(rows)} UNet layouts for the embedded model, each trained with the same proxy schedule "
               f"({s['proxy_steps']} steps x batch {s['batch_size']} on {s['scenes']} precomputed scenes, recipe "
               f"{s['recipe']}, lr {s['lr']}), then scored on {s['n']} held-out prompts (eval split, seed "
               f"{s['scene_seed']}) at {s['steps']} DDIM steps, noise seed {s['seed']}, guidance {s['guidance']}: "
               "FID against the real scenes of those captions, adherence by the scene detector. Latency: median "
               f"per-iteration time of a CFG call (batch {s['latency_batch']} at 16x16, {MAX_TOKENS}-token context), "
               f"{s['latency_repeats']} calls interleaved with the baseline's, {s['torch_threads']} torch threads; "
               "ratio = candidate / baseline.\n\n"
               f"{check['note']}. Pareto set (FID vs latency): {', '.join(result['pareto'])}. Winner (best FID within "
               f"the budget): **{result['winner']}**.\n\n{verdict_text(result)} CIs: paired bootstrap over prompts, "
               f"{result['bootstrap_fid']['n_boot']} replicates.\n\nThese are proxy-schedule numbers: they rank "
               "layouts at equal (short) training. Before a layout replaces the shipped model, train it to the full "
               "budget (`stepsaver.shrink.search.train_winner`) and compare it with the shipped `tiny` "
               "(`stepsaver bench models`).")
    return write_report(name, table, title="Architecture search: UNet layouts under a latency budget",
                        summary=summary, plots=[plot], out_dir=out,
                        extra={k: result[k] for k in ("rows", "pareto", "budget", "winner", "bootstrap_fid",
                                                      "bootstrap_adherence", "verdict", "layouts", "settings")})


__all__ = ["BASELINE", "CANDIDATES", "DEFAULT_BUDGET", "TARGET_SPEEDUP", "Layout", "Ledger", "budget_check",
           "candidates", "default_base", "measure_latencies", "measure_latency", "paired_mean_ci", "pareto",
           "parse_candidates", "search", "ship_verdict", "train_candidate", "train_winner", "verdict_text",
           "write_search_report"]
