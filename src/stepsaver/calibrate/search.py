"""``calibrate``: find the cheapest configuration that keeps the user's tolerance, on the user's model.

The search, in the order it spends time:

1. **Split** the prompts (seeded): a calibration part chooses, a held-out part validates.
2. **Reference** renders (e.g. 50 steps of the model's own scheduler) for every prompt, once.
3. **Screen** every candidate of the :class:`~stepsaver.calibrate.space.SearchSpace` on the
   first ``screen`` calibration prompts, from the most expensive setting of each line down
   (more steps, then a lower Skip threshold, then a higher recommender confidence are assumed
   at least as good): once a candidate misses the tolerance even at its interval's better end,
   the cheaper settings of its line are pruned unrendered.
4. **Calibrate**: the screen's survivors, cheapest first (those that met the tolerance on the
   screen before those that did not), on all calibration prompts (raced: 16 at a time, a clear
   miss dropped at the first look that shows it), until every family (plain
   steps, Skip alone, recommender alone, cache alone, combinations) has its cheapest setting
   that *passes*: holds with confidence (the 95% interval's worse end inside the tolerance) and
   is expected to on the held-out part too (the interval a sample of the held-out size would
   give, predicted from the worst truth that a bound simultaneous over every setting compared
   allows: the cheapest of many passing settings is the one the calibration prompts flattered
   most). The cheapest of those is chosen.
5. **Validate** on the held-out prompts: the chosen setting, and each single knob's cheapest
   setting that holds there (the baseline the combination must beat, found on the same prompts).

Renders are cached on disk (one PNG + JSON per prompt and render key, written atomically, under
a folder locked for the run), so a killed search resumes and candidates that share a render
(the recommender's step counts, the reference) never render twice. Cost is denoiser calls per
image; a diffusers cache, which saves work *inside* each call, is charged its measured
seconds per call relative to the reference's. Wall-clock is reported beside it.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from stepsaver.calibrate.config import CalibratedConfig, pipeline_fingerprint
from stepsaver.calibrate.space import OWN, Candidate, RenderKey, SearchSpace, skip_config, skip_rule
from stepsaver.calibrate.tolerance import Tolerance, parse_tolerance
from stepsaver.errors import StepsaverError
from stepsaver.files import exclusive_folder, write_atomically

__all__ = ["CalibrationResult", "Evaluation", "calibrate"]

SINGLE_KNOBS = ("steps", "skip", "recommender", "cache")
RACE_CHUNK = 16  # calibration prompts per look of the calibration stage's race (see _raced)


class _OutOfTime(Exception):
    """The user's time budget ran out (caught between stages; what was measured is kept)."""


@dataclass
class Render:
    image: np.ndarray  # HxWx3 uint8
    calls: int
    seconds: float  # wall-clock per image (the batch's seconds / its size)


class RenderStore:
    """Renders on disk: ``root/<key digest>/<prompt digest>.{png,json}``, locked by the caller.

    ``root`` holds ``meta.json`` with the model fingerprint and the settings every render shares
    (guidance, size); a folder made for other weights or settings is refused, never mixed.
    """

    def __init__(self, root: Path, meta: dict[str, Any]) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        meta_path = root / "meta.json"
        if meta_path.exists():
            try:
                found = json.loads(meta_path.read_text())
            except (json.JSONDecodeError, OSError, UnicodeDecodeError):
                found = None
            if found != meta:
                raise StepsaverError(f"render cache {root} was made for another model or settings ({found}); "
                                     "use another --work folder (or delete this one)")
        else:
            write_atomically(meta_path, lambda tmp: tmp.write_text(json.dumps(meta, sort_keys=True)))

    @staticmethod
    def _name(prompt: str, seed: int) -> str:
        import hashlib

        return hashlib.sha256(f"{seed}\x00{prompt}".encode()).hexdigest()[:20]

    def get(self, key: RenderKey, prompt: str, seed: int) -> Render | None:
        from PIL import Image

        base = self.root / key.digest / self._name(prompt, seed)
        try:
            info = json.loads(base.with_suffix(".json").read_text())
            if info.get("prompt") != prompt or info.get("seed") != seed:
                return None
            with Image.open(base.with_suffix(".png")) as im:
                image = np.asarray(im.convert("RGB")).copy()
            return Render(image, int(info["calls"]), float(info["seconds"]))
        except (OSError, ValueError, KeyError, json.JSONDecodeError):  # missing or torn: render again
            return None

    def put(self, key: RenderKey, prompt: str, seed: int, render: Render) -> None:
        from PIL import Image

        folder = self.root / key.digest
        if not folder.exists():
            folder.mkdir(parents=True, exist_ok=True)
            write_atomically(folder / "key.json", lambda tmp: tmp.write_text(json.dumps(key.to_dict())))
        base = folder / self._name(prompt, seed)
        # the image first: a JSON without its PNG is never written, a PNG without its JSON is ignored
        write_atomically(base.with_suffix(".png"), lambda tmp: Image.fromarray(render.image).save(tmp, format="PNG"))
        info = {"prompt": prompt, "seed": seed, "calls": render.calls, "seconds": render.seconds}
        write_atomically(base.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(info)))


class _Progress:
    """One Rich bar whose total grows as work is planned (how much the pruning leaves is known late)."""

    def __init__(self, show: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description:<44}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("images"), TimeElapsedColumn(), console=Console(stderr=True),
                                 disable=not show)
        self.task = self.progress.add_task("calibrate", total=0)

    def plan(self, n: int) -> None:
        self.progress.update(self.task, total=(self.progress.tasks[0].total or 0) + n)

    def step(self, description: str, n: int) -> None:
        self.progress.update(self.task, advance=n, description=description)


class Renderer:
    """Makes (or reads back) the renders of one pipeline, configured per :class:`RenderKey`."""

    def __init__(self, pipe: Any, store: RenderStore, guidance: float, batch_size: int,
                 call_kwargs: dict[str, Any], deadline: float | None, progress: _Progress) -> None:
        self.pipe, self.store, self.guidance, self.batch = pipe, store, guidance, batch_size
        self.call_kwargs, self.deadline, self.progress = call_kwargs, deadline, progress
        self.base_scheduler = pipe.scheduler
        self.memory: dict[tuple[str, str, int], Render] = {}
        self.rendered = 0

    @contextmanager
    def configured(self, key: RenderKey) -> Iterator[None]:
        """The pipeline set up for ``key`` for the block, exactly as it was afterwards."""
        from stepsaver.pipelines import make_scheduler
        from stepsaver.skip import disable_adaptive_skip, enable_adaptive_skip

        self.pipe.scheduler = (self.base_scheduler.__class__.from_config(self.base_scheduler.config)
                               if key.scheduler == OWN else make_scheduler(key.scheduler, self.base_scheduler.config))
        try:
            if key.skip is not None:
                enable_adaptive_skip(self.pipe, skip_config(key.skip))
                try:
                    yield
                finally:
                    disable_adaptive_skip(self.pipe)
            elif key.cache is not None:
                with key.cache.applied(self.pipe, key.steps):
                    yield
            else:
                yield
        finally:
            self.pipe.scheduler = self.base_scheduler

    def renders(self, key: RenderKey, items: Sequence[tuple[str, int]], what: str,
                timed: bool = True) -> list[Render]:
        """One render per (prompt, seed), rendering only what neither memory nor disk has."""
        from stepsaver.generation import generate_images

        found: dict[int, Render] = {}
        for i, (prompt, seed) in enumerate(items):
            r = self.memory.get((key.digest, prompt, seed)) or self.store.get(key, prompt, seed)
            if r is not None:
                found[i] = r
                self.memory[(key.digest, prompt, seed)] = r
        missing = [i for i in range(len(items)) if i not in found]
        if missing:
            self.progress.plan(len(missing))
            with self.configured(key):
                for start in range(0, len(missing), self.batch):
                    if timed and self.deadline is not None and time.monotonic() > self.deadline:
                        raise _OutOfTime
                    idx = missing[start:start + self.batch]
                    results = generate_images(self.pipe, [items[i][0] for i in idx], steps=key.steps,
                                              seeds=[items[i][1] for i in idx], guidance=self.guidance,
                                              output_type="np", **self.call_kwargs)
                    for i, res in zip(idx, results, strict=True):
                        image = np.asarray(res.image)
                        if not np.isfinite(image).all():
                            raise StepsaverError(f"{what} made a non-finite image for prompt {items[i][0]!r}; "
                                                 "the model or setting is broken (try float32 or another scheduler)")
                        image8 = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
                        r = Render(image8, res.denoiser_calls, res.seconds / res.batch_size)
                        self.store.put(key, items[i][0], items[i][1], r)
                        self.memory[(key.digest, *items[i])] = r
                        found[i] = r
                    self.rendered += len(idx)
                    self.progress.step(what, len(idx))
        return [found[i] for i in range(len(items))]


class Scorer:
    """LPIPS (AlexNet), PSNR and SSIM of renders against the reference render of the same prompt."""

    def __init__(self) -> None:
        self.memo: dict[tuple[str, str, int], dict[str, float]] = {}

    def scores(self, key: RenderKey, items: Sequence[tuple[str, int]], renders: Sequence[Render],
               reference: Sequence[Render]) -> dict[str, np.ndarray]:
        import torch

        from stepsaver.measure.lpips import lpips_distance
        from stepsaver.measure.quality import psnr, ssim

        todo = [i for i, it in enumerate(items) if (key.digest, *it) not in self.memo]
        if todo:
            a = torch.from_numpy(np.stack([renders[i].image for i in todo])).permute(0, 3, 1, 2).float() / 255
            b = torch.from_numpy(np.stack([reference[i].image for i in todo])).permute(0, 3, 1, 2).float() / 255
            values = {"lpips": lpips_distance(a * 2 - 1, b * 2 - 1).flatten().tolist(),
                      "psnr": psnr(a, b).clamp(max=100.0).tolist(), "ssim": ssim(a, b).tolist()}
            for j, i in enumerate(todo):
                self.memo[(key.digest, *items[i])] = {m: float(v[j]) for m, v in values.items()}
        rows = [self.memo[(key.digest, *it)] for it in items]
        return {m: np.array([r[m] for r in rows]) for m in ("lpips", "psnr", "ssim")}


@dataclass
class Evaluation:
    """One candidate on one prompt set: per-prompt metrics, calls and seconds, and the verdict."""

    candidate: Candidate
    family: str
    metrics: dict[str, np.ndarray]
    calls: np.ndarray
    seconds: np.ndarray
    tolerance: Tolerance
    cost_factor: float = 1.0
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def n(self) -> int:
        return len(self.calls)

    @property
    def values(self) -> np.ndarray:
        return self.metrics[self.tolerance.metric]

    @property
    def cost(self) -> float:
        """Denoiser calls per image, times the measured per-call cost of a cache (1 otherwise)."""
        return float(self.calls.mean()) * self.cost_factor

    @property
    def holds(self) -> bool:
        return self.tolerance.holds(self.values)

    @cached_property
    def confident(self) -> bool:
        """Holds with confidence (a bootstrap: computed once, the search asks it of every setting often)."""
        return self.tolerance.holds_with_confidence(self.values)

    def passes(self, n_heldout: int, selection: float = 0.0) -> bool:
        """Holds with confidence here, and is expected to on ``n_heldout`` held-out prompts as well.

        ``selection``: the critical value of the settings compared with this one
        (:meth:`Tolerance.selection_critical`); the prediction then starts from the worst truth
        their simultaneous bound allows, not from an estimate the choice itself flatters.
        """
        return self.confident and self.tolerance.expected_to_validate(self.values, n_heldout, selection)

    def hopeless(self) -> bool:
        """Misses the tolerance even at its interval's better end."""
        lo, hi = self.tolerance.interval(self.values)
        better = hi if (self.tolerance.share is not None or not self.tolerance.lower_is_better) else lo
        return not self.tolerance._meets(better)

    def row(self, reference: Evaluation | None = None, n_heldout: int | None = None,
            selection: float = 0.0) -> dict[str, Any]:
        lo, hi = self.tolerance.interval(self.values)
        out = {"setting": self.candidate.label, "family": self.family, "n": self.n,
               "denoiser_calls": round(float(self.calls.mean()), 2), "cost": round(self.cost, 2),
               "seconds_per_image": round(float(self.seconds.mean()), 4),
               "mean_steps": round(float(self.steps.mean()), 2) if self.steps.size else None,
               "lpips": round(float(self.metrics["lpips"].mean()), 4),
               "psnr_db": round(float(np.minimum(self.metrics["psnr"], 100).mean()), 2),
               "ssim": round(float(self.metrics["ssim"].mean()), 4),
               "statistic": round(self.tolerance.statistic(self.values), 4),
               "interval": [round(lo, 4), round(hi, 4)], "holds": self.holds, "confident": self.confident,
               "config": self.candidate.to_dict()}
        if n_heldout is not None:
            out["passes"] = self.passes(n_heldout, selection)
        if reference is not None:
            out["speedup_calls"] = round(reference.cost / self.cost, 3) if self.cost else None
            out["speedup_seconds"] = (round(float(reference.seconds.mean()) / float(self.seconds.mean()), 3)
                                      if self.seconds.mean() > 0 else None)
        return out


@dataclass
class CalibrationResult:
    """The chosen config, every evaluated candidate, the frontier and the held-out check."""

    config: CalibratedConfig | None
    calibration_rows: list[dict[str, Any]]
    screen_rows: list[dict[str, Any]]
    frontier: list[dict[str, Any]]
    heldout: dict[str, Any]
    summary: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary, "chosen": None if self.config is None else self.config.to_dict(),
                "heldout": self.heldout, "frontier": self.frontier, "calibration": self.calibration_rows,
                "screen": self.screen_rows}


def split_prompts(prompts: Sequence[str], heldout: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the calibration and held-out parts (a seeded shuffle; both parts non-empty)."""
    if not 0 < heldout < 1:
        raise StepsaverError(f"the held-out share must be between 0 and 1 (e.g. 0.25), got {heldout}")
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(len(prompts) * heldout))
    if len(prompts) - n_held < 2:
        raise StepsaverError(f"{len(prompts)} prompts cannot be split into calibration and held-out parts; "
                             "give at least 4 (64 or more for a useful interval)")
    return sorted(order[n_held:]), sorted(order[:n_held])


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise StepsaverError("calibrate takes a list of prompts (one per line in a --prompts file)")
    from stepsaver.generation import validate_request

    out = [p.strip() for p in prompts]
    for p in out:
        validate_request(p, 1, 0.0)
    if len(out) < 4:
        raise StepsaverError(f"calibrate needs at least 4 prompts to split into calibration and held-out parts, "
                             f"got {len(out)}")
    return out


class _Search:
    """The state of one calibration run (see the module docstring for the stages)."""

    def __init__(self, prompts: list[str], tolerance: Tolerance, reference: Candidate, renderer: Renderer,
                 recommender: Any, seed: int) -> None:
        self.prompts, self.tol, self.reference = prompts, tolerance, reference
        self.renderer, self.rec = renderer, recommender
        self.seeds = [seed + i for i in range(len(prompts))]
        self.scorer = Scorer()
        self.steps_memo: dict[tuple[float, int], int] = {}
        self.say: Callable[[str], None] = lambda _msg: None

    def note(self, stage: str, e: Evaluation, verdict: str) -> None:
        lo, hi = e.tolerance.interval(e.values)
        self.say(f"{stage}: {e.candidate.label}: {e.tolerance.metric} {e.tolerance.statistic(e.values):.4g} "
                 f"[{lo:.4g}, {hi:.4g}] on {e.n} prompts, {e.cost:.1f} calls/image: {verdict}")

    def steps_of(self, candidate: Candidate, i: int) -> int:
        if candidate.steps is not None:
            return candidate.steps
        key = (candidate.confidence, i)
        if key not in self.steps_memo:
            recs = self.rec.recommend(self.prompts, confidence=candidate.confidence)
            for j, r in enumerate(recs):
                self.steps_memo[(candidate.confidence, j)] = r.steps
        return self.steps_memo[key]

    def evaluate(self, candidate: Candidate, indices: Sequence[int], what: str, timed: bool = True) -> Evaluation:
        ref_key = self.reference.key(self.reference.steps)
        groups: dict[RenderKey, list[int]] = {}
        for i in indices:
            groups.setdefault(candidate.key(self.steps_of(candidate, i)), []).append(i)
        per: dict[int, tuple[Render, dict[str, float]]] = {}
        ref_items = [(self.prompts[i], self.seeds[i]) for i in indices]
        ref = dict(zip(indices, self.renderer.renders(ref_key, ref_items, "reference", timed=False), strict=True))
        for key, idx in groups.items():
            items = [(self.prompts[i], self.seeds[i]) for i in idx]
            renders = self.renderer.renders(key, items, what, timed=timed)
            scores = self.scorer.scores(key, items, renders, [ref[i] for i in idx])
            for j, i in enumerate(idx):
                per[i] = (renders[j], {m: float(v[j]) for m, v in scores.items()})
        order = list(indices)
        calls = np.array([per[i][0].calls for i in order], dtype=float)
        seconds = np.array([per[i][0].seconds for i in order])
        factor = 1.0
        if candidate.cache is not None:  # charged its measured seconds per call relative to the reference's
            ref_rate = np.median([ref[i].seconds / max(ref[i].calls, 1) for i in order])
            rate = np.median(seconds / np.maximum(calls, 1))
            factor = float(rate / ref_rate) if ref_rate > 0 else 1.0
        return Evaluation(candidate, candidate.family(self.reference),
                          {m: np.array([per[i][1][m] for i in order]) for m in ("lpips", "psnr", "ssim")},
                          calls, seconds, self.tol, factor,
                          np.array([self.steps_of(candidate, i) for i in order], dtype=float))


def no_better_than(c: Candidate, h: Candidate) -> bool:
    """Whether ``c`` is expected to be at most as good as ``h`` (so a hopeless ``h`` prunes ``c``).

    Assumed orders, each the way the knob trades quality for cost: fewer steps; Skip on, a higher
    threshold or a larger C_max (the criterion and the fixed rule are one family, the fixed rule
    above every threshold; the drift rule is ordered only against itself); a cache on; a lower
    recommender confidence. Plain steps are at least as good as any Skip or cache setting at the
    same or fewer steps.
    """
    if c.scheduler != h.scheduler:
        return False
    if c.confidence is not None or h.confidence is not None:
        return (c.confidence is not None and h.confidence is not None and c.skip == h.skip and c.cache == h.cache
                and c.confidence <= h.confidence)
    if c.steps > h.steps:  # type: ignore[operator]
        return False
    if h.skip is None and h.cache is None:
        return True
    if h.skip is not None:  # within one family of rules (the drift rule's threshold is another quantity)
        return c.skip is not None and (skip_rule(c.skip) == "drift") == (skip_rule(h.skip) == "drift") and \
            c.skip[0] >= h.skip[0] and c.skip[1] >= h.skip[1]
    return c.cache == h.cache


def _best_first(c: Candidate) -> tuple:
    """Screening order: the most expensive setting of every kind first, so pruning can cut the rest."""
    if c.confidence is not None:
        return (1, -c.confidence, 0.0, 0)
    return (0, -(c.steps or 0), 0.0 if c.skip is None else c.skip[0], 0 if c.skip is None else c.skip[1],
            c.cache is not None)


def _frontier(evals: Sequence[Evaluation], tol: Tolerance) -> list[Evaluation]:
    """Pareto set: no other evaluation is at most as costly and at least as good on the tolerance metric."""
    sign = -1.0 if tol.lower_is_better else 1.0  # higher score = better
    pts = sorted(evals, key=lambda e: (e.cost, -sign * float(np.mean(e.values))))
    out, best = [], -math.inf
    for e in pts:
        score = sign * float(np.mean(e.values))
        if score > best + 1e-12:
            out.append(e)
            best = score
    return out


def calibrate(pipe: Any, prompts: Sequence[str], tolerance: str | Tolerance, *, model: str | None = None,
              reference_steps: int = 50, reference_scheduler: str = OWN, space: SearchSpace | None = None,
              recommender: Any = None, guidance: float = 5.0, heldout: float = 0.25, screen: int = 8,
              seed: int = 0, split_seed: int = 0, batch_size: int = 8, budget_minutes: float | None = None,
              work: str | Path | None = None, show_progress: bool = False, labels: Sequence[dict] | None = None,
              log: Callable[[str], None] | None = None, **call_kwargs: Any) -> CalibrationResult:
    """Find the cheapest configuration of ``pipe`` whose images stay within ``tolerance`` of the reference.

    ``tolerance`` is e.g. ``"lpips<=0.05"`` or ``"lpips<=0.05 for 95%"``; the reference is
    ``reference_steps`` of ``reference_scheduler`` (``"own"``: the pipeline's scheduler).
    ``recommender`` (a :class:`~stepsaver.predict.StepRecommender` or its name) adds the
    recommender to the search. Prompt ``i`` always starts from seed ``seed + i``. Renders are
    cached under ``work`` (default: a temporary folder), so a rerun resumes. ``labels``: label rows
    of this model with several seeds per prompt (``stepsaver label --seeds 3``); their
    predictability (how much of the step label the prompt alone decides, the ceiling of any
    text-only recommender) goes into the summary, so the user learns whether Predict can pay
    on this model before training a recommender for it. Returns the result
    with ``config`` = the chosen :class:`CalibratedConfig` (save it with ``.save(path)``), or
    raises :class:`StepsaverError` naming the closest candidate when nothing meets the tolerance.
    """
    import tempfile

    started, cpu0 = time.monotonic(), time.process_time()
    say = log or (lambda _msg: None)
    tol = parse_tolerance(tolerance)
    prompts = _check_prompts(prompts)
    space = space or SearchSpace()
    space.validate(reference_steps)
    for name in (*space.schedulers, reference_scheduler):
        if name != OWN:
            from stepsaver.pipelines import scheduler_spec

            scheduler_spec(name)
    if budget_minutes is not None and not (budget_minutes > 0 and math.isfinite(budget_minutes)):
        raise StepsaverError(f"the time budget must be a positive number of minutes, got {budget_minutes}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise StepsaverError(f"batch size must be an integer >= 1, got {batch_size!r}")
    rec_name = str(recommender) if isinstance(recommender, (str, Path)) else getattr(recommender, "source", "tiny")
    if isinstance(recommender, (str, Path)):
        from stepsaver.predict import StepRecommender

        recommender = StepRecommender.load(recommender)
    from stepsaver.caches import cache_kinds_for

    cal, held = split_prompts(prompts, heldout, split_seed)
    screen_idx = cal[:max(2, min(screen, len(cal)))]
    fingerprint = pipeline_fingerprint(pipe)
    reference = Candidate(reference_scheduler, reference_steps)
    meta = {"fingerprint": fingerprint, "guidance": guidance, "call_kwargs": sorted(map(str, call_kwargs.items())),
            "batch_size": batch_size}
    deadline = started + budget_minutes * 60 if budget_minutes else None
    progress = _Progress(show_progress)
    temp = None if work is not None else tempfile.TemporaryDirectory(prefix="stepsaver-calibrate-")
    root = Path(work) if work is not None else Path(temp.name)  # type: ignore[union-attr]
    stage = "screen"
    try:
        with exclusive_folder(root, "calibration"), progress.progress:
            renderer = Renderer(pipe, RenderStore(root / fingerprint, meta), guidance, batch_size, call_kwargs,
                                deadline, progress)
            search = _Search(prompts, tol, reference, renderer, recommender, seed)
            search.say = say
            say(f"reference: {reference.label} on {len(prompts)} prompts")
            search.evaluate(reference, list(range(len(prompts))), "reference", timed=False)
            candidates = [c for c in space.candidates(reference, recommender is not None, cache_kinds_for(pipe))
                          if c != reference]
            screened: list[Evaluation] = []
            calibrated: list[Evaluation] = []
            critical = selection_critical(tol, calibrated, len(cal))
            out_of_time = False
            try:
                screened = _screen(search, candidates, screen_idx)
                stage = "calibration"
                calibrated, critical = _calibrate_stage(search, screened, cal, len(held))
            except _OutOfTime:
                out_of_time = True
                say(f"time budget of {budget_minutes:g} min ran out during the {stage} stage")
            ref_cal = search.evaluate(reference, cal, "reference", timed=False)
            passing = ([e for e in calibrated if e.passes(len(held), critical)]
                       or [e for e in calibrated if e.confident])
            chosen = min(passing, key=lambda e: (e.cost, -e.tolerance.slack(e.values)), default=None)
            if chosen is None:
                pool = calibrated or screened
                if not pool:
                    raise StepsaverError("the time budget ran out before any candidate was measured; give "
                                         "--budget-minutes more time (the renders so far are kept in the work folder)")
                closest = max(pool, key=lambda e: e.tolerance.slack(e.values))
                if not out_of_time or not any(e.holds for e in pool):
                    raise StepsaverError(
                        f"no configuration meets {tol} on the calibration prompts; the closest was "
                        f"{closest.candidate.label} with {tol.metric} {tol.statistic(closest.values):.4g} "
                        f"(reference: {reference.label}); loosen the tolerance or add more steps to the search")
                chosen = min((e for e in pool if e.holds), key=lambda e: e.cost)
            say(f"chosen: {chosen.candidate.label} ({chosen.cost:.1f} calls per image)")
            kept = [e for e in screened if not e.hopeless()]
            held_rows, held_summary = _validate(search, chosen, [*calibrated, *kept], held, ref_cal)
    finally:
        if temp is not None:
            temp.cleanup()
    cal_rows = [e.row(ref_cal, len(held), critical) for e in sorted(calibrated, key=lambda e: e.cost)]
    frontier = [e.row(ref_cal) for e in _frontier(calibrated or screened, tol)]
    wall, cpu = time.monotonic() - started, time.process_time() - cpu0
    predict = _predictability(labels)
    summary = {"tolerance": str(tol), "reference": reference.to_dict(), "prompts": len(prompts),
               "calibration_prompts": len(cal), "heldout_prompts": len(held), "screen_prompts": len(screen_idx),
               "candidates": len(candidates), "screened": len(screened), "calibrated": len(calibrated),
               "renders_made": renderer.rendered, "wall_minutes": round(wall / 60, 2),
               "cpu_minutes": round(cpu / 60, 2), "out_of_time": out_of_time,
               "chosen": chosen.candidate.label, "chosen_confident_on_calibration": chosen.confident,
               "chosen_expected_to_validate": chosen.passes(len(held), critical),
               "selection_critical": round(critical, 3),
               "compared_on_all_calibration_prompts": sum(e.n == len(cal) for e in calibrated),
               **held_summary, **predict}
    config = CalibratedConfig(
        model=model or str(getattr(pipe, "name_or_path", "") or type(pipe).__name__), fingerprint=fingerprint,
        candidate=chosen.candidate, tolerance=str(tol), reference=reference.to_dict(), guidance=guidance,
        recommender=rec_name if chosen.candidate.confidence is not None else None,
        scheduler_class=type(pipe.scheduler).__name__ if chosen.candidate.scheduler == OWN else "",
        calibration=chosen.row(ref_cal, len(held), critical), heldout=held_summary)
    return CalibrationResult(config, cal_rows, [e.row() for e in screened], frontier, {"rows": held_rows,
                                                                                         **held_summary}, summary)


def _predictability(labels: Sequence[dict] | None) -> dict[str, Any]:
    """The predictability keys of the summary (nothing when no labels were given)."""
    if labels is None:
        return {}
    from stepsaver.predict.dataset import predictability, predictability_summary

    try:
        p = predictability(labels)
    except StepsaverError as exc:  # e.g. one seed per prompt: say why, do not fail a finished search
        return {"predictability": None, "predictability_note": str(exc)}
    return {"predictability": p, "predictability_note": predictability_summary(p)}


def _screen(search: _Search, candidates: Sequence[Candidate], idx: Sequence[int]) -> list[Evaluation]:
    """Every candidate on the screen prompts, best first; what a hopeless one is expected to beat is cut."""
    out: list[Evaluation] = []
    hopeless: list[Candidate] = []
    for c in sorted(candidates, key=_best_first):
        if any(no_better_than(c, h) for h in hopeless):
            continue
        e = search.evaluate(c, idx, f"screen: {c.label}")
        out.append(e)
        if e.hopeless():
            hopeless.append(c)
        search.note("screen", e, "hopeless: prunes what it is expected to beat" if e.hopeless() else "kept")
    return out


def _raced(search: _Search, candidate: Candidate, cal: Sequence[int], what: str,
           chunk: int = RACE_CHUNK) -> Evaluation:
    """``candidate`` on growing prefixes of the calibration prompts, stopped at the first hopeless one.

    Why (racing, as in F-race or Hoeffding races): most settings the calibration stage measures
    miss, and a clear miss is clear long before all calibration prompts are rendered; one that
    misses even at its interval's better end on ``chunk`` prompts is dropped there (renders are
    cached per prompt, so each look renders only the new prompts). Only a miss stops early: a
    setting is chosen on every calibration prompt, never on a prefix. The returned evaluation's
    ``n`` says how many prompts it saw.
    """
    for k in range(chunk, len(cal), chunk):  # the looks before the last
        e = search.evaluate(candidate, cal[:k], what)
        if e.hopeless():
            return e
    return search.evaluate(candidate, cal, what)


def selection_critical(tol: Tolerance, evaluations: Sequence[Evaluation], n: int) -> float:
    """The winner's-curse critical value over the settings measured on all ``n`` calibration prompts."""
    return tol.selection_critical([e.values for e in evaluations if e.n == n])


def _calibrate_stage(search: _Search, screened: Sequence[Evaluation], cal: Sequence[int],
                     n_heldout: int) -> tuple[list[Evaluation], float]:
    """Survivors on all calibration prompts, cheapest first, until each family has a passing setting.

    Passing means holding with confidence on the calibration prompts *and* being expected to on
    ``n_heldout`` held-out prompts (:meth:`Tolerance.worse_end_at`): the held-out check has fewer
    prompts, so a setting that only just fits here would fail there. The prediction starts from
    the worst truth a bound simultaneous over every setting compared so far allows
    (:meth:`Tolerance.selection_critical`): choosing the cheapest of many settings that pass
    picks the ones the calibration prompts flattered, and every earlier tiny run's held-out mean
    came out above its calibration mean. The bound widens as settings are added, so a family's
    passing setting can stop passing; the scan then resumes with that family's next setting,
    until a whole scan measures nothing new. Returns the evaluations and the final critical value.

    Two passes per scan: first the settings whose screen estimate already met the tolerance;
    then, only for families still without a passing setting, the survivors that missed it on the
    screen (on 8 prompts an estimate that misses rarely holds with confidence on all of them,
    and at a tight tolerance most cheap settings miss, so this halves the work there).
    """
    survivors = sorted((e for e in screened if not e.hopeless()), key=lambda e: e.cost)
    families = {s.family for s in survivors}
    hopeless: list[Candidate] = []
    out: list[Evaluation] = []
    measured: set[Candidate] = set()
    critical = selection_critical(search.tol, out, len(cal))

    def done() -> set[str]:
        return {x.family for x in out if x.passes(n_heldout, critical)}

    while True:
        before = len(measured)
        for passing in ([e for e in survivors if e.holds], [e for e in survivors if not e.holds]):
            for e in passing:
                if e.candidate in measured or e.family in done():
                    continue  # measured already, or a cheaper setting of this family passes
                if any(no_better_than(e.candidate, h) for h in hopeless):
                    continue  # expected no better than a setting that missed on all calibration prompts
                full = _raced(search, e.candidate, cal, f"calibrate: {e.candidate.label}")
                measured.add(e.candidate)
                if full.hopeless():
                    hopeless.append(e.candidate)
                out.append(full)
                critical = selection_critical(search.tol, out, len(cal))
                search.note("calibrate", full, "passes" if full.passes(n_heldout, critical) else
                            f"holds with confidence, but too close for {n_heldout} held-out prompts after "
                            f"comparing {len(out)} settings" if full.confident
                            else "holds (point estimate only)" if full.holds else "misses")
                if done() >= families:
                    return out, critical
        if len(measured) == before:
            return out, critical


def _validate(search: _Search, chosen: Evaluation, pool: Sequence[Evaluation], held: Sequence[int],
              ref_cal: Evaluation) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The chosen setting on the held-out prompts, and each single knob's cheapest setting that holds there."""
    reference = search.evaluate(search.reference, held, "reference", timed=False)
    mine = search.evaluate(chosen.candidate, held, "held-out: chosen", timed=False)
    rows = [dict(mine.row(reference), role="chosen")]
    singles: dict[str, dict[str, Any]] = {}
    by_family: dict[str, list[Candidate]] = {}
    for e in sorted(pool, key=lambda e: e.cost):  # every setting the screen kept, not only those calibrated
        if e.family in SINGLE_KNOBS and e.candidate not in by_family.get(e.family, []):
            by_family.setdefault(e.family, []).append(e.candidate)
    for family, cands in by_family.items():
        for c in cands:  # cheapest first: the first that holds with confidence on these prompts is the baseline
            e = search.evaluate(c, held, f"held-out: {family}", timed=False)
            if e.confident:
                singles[family] = dict(e.row(reference), role=f"best {family} alone")
                rows.append(singles[family])
                break
    best_single = min(singles.values(), key=lambda r: r["cost"], default=None)
    summary = {"heldout_statistic": round(mine.tolerance.statistic(mine.values), 4),
               "heldout_interval": [round(x, 4) for x in mine.tolerance.interval(mine.values)],
               "heldout_holds": mine.holds, "heldout_holds_with_confidence": mine.confident,
               "speedup_calls": round(reference.cost / mine.cost, 3),
               "speedup_seconds": round(float(reference.seconds.mean()) / float(mine.seconds.mean()), 3),
               "best_single_knob": None if best_single is None else best_single["setting"],
               "vs_best_single_knob": None if best_single is None else round(best_single["cost"] / mine.cost, 3)}
    return rows, summary
