"""AdaptiveDiffusion step skipping as one diffusers ``ModelHook`` on any pipeline's denoiser.

``enable_adaptive_skip(pipe, AdaptiveSkipConfig(...))`` registers :class:`AdaptiveSkipHook` through
``diffusers.hooks.HookRegistry`` on ``pipe.unet`` or ``pipe.transformer``; no pipeline code is
copied or edited. The hook's ``new_forward`` either runs the network or hands back the cached raw
output (the whole CFG batch, before guidance); guidance and ``scheduler.step`` run every step.

How it is wired (decisions worth knowing):

* **Latents.** The criterion needs the latents *after* each scheduler step (for Euler-type
  samplers the denoiser input is scaled, so it is not the latent). The hook wraps the bound
  ``step`` of ``pipe.scheduler`` (an instance attribute, ``functools.wraps`` keeps the signature
  pipelines inspect) and reads ``prev_sample`` from its output. This works on pipelines without
  ``callback_on_step_end`` (PixArt) and leaves that argument to the user.
* **Reset per call.** Every diffusers pipeline calls ``scheduler.set_timesteps`` once before its
  loop; the wrapped ``set_timesteps`` bumps a generation counter and the first denoiser call of
  the new generation resets the state (cache, history, report). A scheduler swapped in since the
  last call (``pipe.scheduler = ...``) is detected by identity, wrapped, and also starts a new
  call. Diffusers' own end-of-call ``reset_stateful_hooks`` (via ``maybe_free_model_hooks``,
  on models that have it) only frees the cached tensors; the report of the call stays readable.
* **Second-order samplers** (Heun, DPM2: ``state_in_first_order`` is ``False`` between their two
  ``step`` calls): a *scheduler step* ends when the scheduler is back in first order. ``L_j`` is
  the latent after the completed step (the half-step latent is not used), one decision covers
  both denoiser calls of the next step, and a skipped call returns the most recently computed
  output (the second call of the previous step; for Heun that call is at the sigma where the next
  step starts, for DPM2 at the interpolated sigma between the two, so the reuse is an
  approximation there). The sampler's last step is first-order only and leaves it in second order; it is
  still recorded. Compat mode decides per ``step`` call instead, like the official loop.
* **Per-sample paths.** The denoiser batch is ``k`` stacked copies of the ``B`` latents
  (``k = 2`` with CFG: ``[uncond; cond]``), so sample ``i`` owns rows ``i, i + B, ...``. When some
  samples compute and others skip, every tensor argument whose first dimension equals the
  denoiser batch (nested in tuples, lists and dicts too, e.g. SDXL's ``added_cond_kwargs`` or
  PixArt's per-row timesteps) is sliced to the computing rows, the network runs on those, and
  the cached rows are spliced back. A batch of N prompts then follows the same paths as N
  separate calls (equal to float tolerance).
* **The decision is a policy.** :class:`SkipPolicy` decides after each completed step which
  samples reuse the cache at the next one, and runs each full network call (``run``). The
  AdaptiveDiffusion criterion (:class:`CriterionPolicy`, built from the config) is the default;
  the oracle passes a policy of given skips that replays recorded outputs, instead of
  subclassing the hook.
* **Calls are reported as they ran.** Every denoiser call is logged per sample (computed or
  answered from the cache), and the report is published to the core
  (:func:`stepsaver.calls.publish_call_report`), which is how ``generate`` learns each image's
  calls without importing Skip.
* **Several calls per step.** A pipeline may call the denoiser more than once between two
  ``scheduler.step`` calls (Flux's true CFG: cond, then uncond). The decision is made once per
  scheduler step and each call is cached and reused by its position within the step.
* **A sample is one image or one video.** Video pipelines (TextToVideoSD, I2VGenXL) step the
  scheduler on ``batch * frames`` rows; the hook reads the frame count from the denoiser's 5-D
  input, so a video follows one path and its CFG rows are never split by frame. Pipelines that
  step the scheduler on CFG-duplicated latents (DiT) count one sample per image, not per CFG row.
* **Scheduler-aware by default** (``scale="sigma"``, ``reuse="auto"``: the noise prediction, or the
  data prediction on schedulers that add fresh noise each step). ``D_j`` is measured in the
  scheduler's variance-exploding ODE variable per unit of noise level crossed
  (:mod:`stepsaver.skip.noise` reads the level from the scheduler after each step), so Karras,
  Euler and flow-matching step sizes compare fairly; a skipped call of a v-prediction model reuses
  the noise prediction re-expressed at the new step rather than the raw ``v``. The paper's rule
  (raw latent differences, raw output) is ``scale="latent", reuse="output"``; ``compat=True``
  reproduces the official code.
* **torch.compile.** ``new_forward`` is skipped by dynamo and its bookkeeping is disabled, so only
  the network's own forward is compiled, whichever was applied first (hook, then
  ``torch.compile``/``module.compile()``, or the reverse), with no guards on the hook's state.
* **diffusers' caches.** MagCache and TaylorSeer count the calls they see; a call answered from
  our cache never reaches them, so the pair is refused in either order (``STEP_COUNTING_CACHES``).
* **Rules.** ``rule="criterion"`` (the paper's third-order test), ``"fixed"`` (one call every
  ``max_skips + 1`` steps: the baseline) and ``"drift"`` (default): at every computed step the hook also
  builds what reuse would have returned (``_reused``, exactly what a skip hands the pipeline) and
  measures its relative error per sample; the error per reused step extrapolates whether the
  next step may reuse. It learns only from computed outputs, which matters because a skipped step
  makes the latent move at the cached speed, so the criterion's differences after a skip carry no
  news (it then skips until C_max). The errors are in the report (``drift``).
* **The report records what ran.** A step the policy marked skippable but that had to compute
  (no cached output yet, or another hook changed the row count) is reported as computed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState

from stepsaver.calls import denoiser_of, publish_call_report
from stepsaver.errors import StepsaverError
from stepsaver.skip.config import AdaptiveSkipConfig
from stepsaver.skip.criterion import (
    consecutive_skips,
    latent_difference,
    next_step_skipped,
    next_step_skipped_batched,
    official_next_step_skipped,
)
from stepsaver.skip.noise import PREDICTIONS, NoiseLevel, call_level, from_prediction, noise_level, to_prediction

__all__ = ["HOOK_NAME", "AdaptiveSkipConfig", "AdaptiveSkipHook", "CriterionPolicy", "SkipPolicy", "SkipReport",
           "disable_adaptive_skip", "enable_adaptive_skip", "skip_report", "split_output"]

HOOK_NAME = "stepsaver_adaptive_skip"
_MARK = "_stepsaver_adaptive_skip"


@dataclass
class SkipReport:
    """What the hook did in one pipeline call.

    ``computed[s][i]`` says whether sample ``i`` ran the denoiser in scheduler step ``s`` (in compat
    mode ``s`` counts ``scheduler.step`` calls). ``diffs[j-1]`` holds ``D_j`` per sample (one value
    in shared/compat mode). ``pipeline_calls`` counts the pipeline's calls of the denoiser,
    ``denoiser_calls`` the network runs (a run on a subset of rows counts once), ``rows_*`` the
    batch rows asked for and computed.
    """

    mode: str
    threshold: float
    max_skips: int
    warmup: int
    batch_size: int
    computed: list[list[bool]] = field(default_factory=list)
    diffs: list[list[float]] = field(default_factory=list)
    pipeline_calls: int = 0
    denoiser_calls: int = 0
    rows_requested: int = 0
    rows_computed: int = 0
    sample_calls: list[int] = field(default_factory=list)  # per sample: calls whose rows were computed
    sample_saved: list[int] = field(default_factory=list)  # per sample: calls answered from the cache
    scale: str = "latent"
    reuse: str = "output"
    unscaled: list[int] = field(default_factory=list)  # "sigma" scale: j of each D_j left in latent units
    rule: str = "criterion"
    # rule="drift": per completed step, each sample's measured relative error of reusing the cache
    # there (None where the sample skipped or nothing was cached yet)
    drift: list[list[float | None]] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.computed)

    @property
    def calls_saved(self) -> int:
        return self.pipeline_calls - self.denoiser_calls

    def path(self, sample: int = 0) -> list[bool]:
        """Skip flags of one sample, step by step (``True`` = reused the cache)."""
        return [not row[sample] for row in self.computed]

    def skipped_steps(self, sample: int = 0) -> list[int]:
        return [s for s, row in enumerate(self.computed) if not row[sample]]

    def calls_of(self, sample: int = 0) -> int:
        """Denoiser calls that ran for ``sample`` (part of :class:`stepsaver.calls.CallReport`)."""
        return self.sample_calls[sample] if self.sample_calls else self.denoiser_calls

    def saved_of(self, sample: int = 0) -> int:
        """Calls of the pipeline that ``sample`` got from the cache."""
        return self.sample_saved[sample] if self.sample_saved else self.calls_saved

    def why_no_savings(self) -> str:
        """Why a call saved nothing ('' when it saved some): the reason a user would look for."""
        if self.calls_saved:
            return ""
        if self.max_skips == 0 or (self.threshold == 0 and self.rule != "fixed"):
            return "calls saved 0 because threshold or max_skips is 0 (skipping off)"
        if self.steps <= self.warmup:
            return (f"calls saved 0 because {self.steps} steps <= warmup {self.warmup}: the first {self.warmup} "
                    "steps always run the denoiser")
        if self.rule == "drift":
            return (f"calls saved 0 because the measured error of reusing the cache never fell to the threshold "
                    f"{self.threshold} after the {self.warmup} warm-up steps: few-step schedulers (LCM, Turbo, 4-8 "
                    "steps) change the denoiser's output too much per step; raise the threshold or use more steps")
        return (f"calls saved 0 because no step after the {self.warmup} warm-up steps met the threshold "
                f"{self.threshold}: few-step schedulers (LCM, Turbo, 4-8 steps) move the latent too much per step "
                "for the third-order test; raise the threshold or use more steps")

    def summary(self) -> dict[str, Any]:
        note = {"note": self.why_no_savings()} if not self.calls_saved else {}
        unscaled = {"unscaled_differences": self.unscaled} if self.unscaled else {}
        return {**note, **unscaled, "mode": self.mode, "rule": self.rule, "scale": self.scale, "reuse": self.reuse,
                "threshold": self.threshold,
                "max_skips": self.max_skips,
                "steps": self.steps,
                "batch_size": self.batch_size, "pipeline_calls": self.pipeline_calls,
                "denoiser_calls": self.denoiser_calls, "calls_saved": self.calls_saved,
                "rows_requested": self.rows_requested, "rows_computed": self.rows_computed,
                "skipped_steps": [self.skipped_steps(i) for i in range(self.batch_size)]}


class _SkipState(BaseState):
    """Per-call state; ``reset`` starts a new call, ``release`` drops the tensors only."""

    def __init__(self) -> None:
        self.generation = -1
        self.reset()

    def reset(self, generation: int = -1) -> None:
        self.generation = generation
        self.active = True
        self.batch: int | None = None  # samples: images or videos (known from the first scheduler.step)
        self.frames: int | None = None  # frames per sample (5-D video denoiser input), else 1
        self.duplicated = False  # the scheduler steps on [x; x] CFG copies of the latents (DiT)
        self.diffs: list[Any] = []  # D_1.. : [B] float lists (per sample), floats (shared), 0-dim tensors (compat)
        self.path: list[Any] = [None]  # decision per step; None = compute all (step 0 / warmup before B known)
        self.started = 0  # steps that have seen a denoiser call
        self.step_open = False
        self.calls_since_step = 0
        self.cache: dict[int, torch.Tensor] = {}  # raw denoiser output per call position within the step
        self.rebuild: dict[int, Callable[[torch.Tensor], Any]] = {}
        self.cache_input: dict[int, tuple[torch.Tensor, NoiseLevel | None]] = {}  # reuse="noise": x and level
        self.step_ran: list[list[bool] | bool] = []  # per started step: which samples ran the network
        self.prev_latent: torch.Tensor | None = None  # in the criterion's variable (x / alpha for "sigma")
        self.prev_level: NoiseLevel | None = None
        self.timestep: Any = None  # of the scheduler.step call in progress
        self.unscaled: list[int] = []
        self.pipeline_calls = self.denoiser_calls = self.rows_requested = self.rows_computed = 0
        self.call_log: list[list[bool] | bool] = []  # per pipeline call: rows computed, per sample or for all
        # rule="drift": this step's |fresh - would-be reuse| and |fresh| sums per sample (or one bucket),
        # each sample's last computed step, and its error added per reused step (None until measured)
        self.drift_num: dict[int, float] = {}
        self.drift_den: dict[int, float] = {}
        self.last_run: dict[int, int] = {}
        self.drift_rate: dict[int, float] = {}
        self.drift_errors: list[list[float | None]] = []  # per step: measured reuse error per sample (report)

    def release(self) -> None:
        self.cache, self.rebuild, self.cache_input, self.prev_latent = {}, {}, {}, None
        self.active = False

    def samples_of(self, latent_rows: int) -> int:
        """Samples in a latent batch of ``latent_rows`` rows (CFG copies and frames folded in)."""
        rows = latent_rows // 2 if self.duplicated else latent_rows
        frames = self.frames or 1
        return rows // frames if rows % frames == 0 else rows

    def per_sample_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """``[samples, ...]``: one row per image or video (frames flattened in, the CFG copy dropped)."""
        samples = self.samples_of(latent.shape[0])
        if self.duplicated:
            latent = latent[: latent.shape[0] // 2]
        return latent.reshape(samples, -1)


def split_output(out: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """The denoiser's main output tensor and a function that rebuilds the output around another one."""
    if isinstance(out, torch.Tensor):
        return out, lambda t: t
    if dataclasses.is_dataclass(out):
        name = dataclasses.fields(out)[0].name
        rest = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)[1:]}
        cls = type(out)
        return getattr(out, name), lambda t: cls(**{name: t}, **rest)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        cls, rest = type(out), tuple(out[1:])
        return out[0], lambda t: cls((t, *rest))
    raise StepsaverError(f"adaptive skip cannot cache a denoiser output of type {type(out).__name__}")


def _rows_of(value: Any, rows: int, index: torch.Tensor) -> Any:
    """Slice every tensor whose first dimension is the denoiser batch (recursing into containers)."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, index.to(value.device)) if value.ndim and value.shape[0] == rows else value
    if isinstance(value, dict):
        return {k: _rows_of(v, rows, index) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_rows_of(v, rows, index) for v in value)
    return value


# Pipelines whose loop steps the scheduler on CFG copies [x; x] of the latents: one sample per pair.
CFG_DUPLICATED_LATENTS = frozenset({"DiTPipeline"})


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    first = args[0] if args else next((kwargs[k] for k in ("sample", "hidden_states", "x") if k in kwargs), None)
    if not isinstance(first, torch.Tensor) or first.ndim == 0:
        raise StepsaverError("adaptive skip could not find the denoiser's batched input (sample/hidden_states)")
    return first


def _union(a: list[bool] | bool, b: list[bool] | bool) -> list[bool] | bool:
    """Samples that ran in either of two calls of one step (``True``/``False`` stand for all/none)."""
    if isinstance(a, bool) and isinstance(b, bool):
        return a or b
    if isinstance(a, bool):
        return [True] * len(b) if a else list(b)
    if isinstance(b, bool):
        return [True] * len(a) if b else list(a)
    return [x or y for x, y in zip(a, b, strict=True)]


def _prev_sample(out: Any) -> torch.Tensor | None:
    sample = getattr(out, "prev_sample", None)
    if sample is None and isinstance(out, (tuple, list)) and out:
        sample = out[0]
    return sample if isinstance(sample, torch.Tensor) else None


@dataclass
class _Call:
    """How one denoiser call is answered (made outside any compiled graph by ``AdaptiveSkipHook._open``)."""

    kind: str  # "pass" | "all" (compute every row) | "reuse" (cache) | "rows" (compute some rows)
    position: int = 0
    rows: int = 0
    first: Any = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    forward_args: tuple | None = None  # None: the network is not run
    forward_kwargs: dict = field(default_factory=dict)
    plain: bool = True  # the policy's run() is the default (call the network directly)
    step: int = 0
    reused: Any = None
    index: Any = None
    skip: list[bool] = field(default_factory=list)
    would: Any = None  # rule="drift", a computed call: what reusing the cache would have returned


class SkipPolicy:
    """What the hook asks at each step: which samples reuse the cache next, and how to run a call.

    ``decide`` sees the history after a completed scheduler step: ``diffs`` (``D_1..D_j``, per
    sample lists, floats, or 0-dim tensors in compat mode), ``path`` (the decisions so far; ``None``
    = computed) and ``batch`` (the latents' batch). It returns one flag for the whole batch or a
    list with one flag per sample (``True`` = reuse). ``run(step, forward)`` makes one full network
    call of step ``step``; the default just calls ``forward()``. A policy with ``uses_drift`` also
    gets ``drift``: per sample (or one value when not per sample) the estimated relative error of
    reusing the cache at the next step, ``None`` where no computed step has measured it yet.
    """

    per_sample: bool = False
    uses_drift: bool = False

    def decide(self, diffs: list[Any], path: list[Any], batch: int) -> bool | list[bool]:
        raise NotImplementedError

    def run(self, step: int, forward: Callable[[], Any]) -> Any:
        return forward()


class CriterionPolicy(SkipPolicy):
    """AdaptiveDiffusion's third-order criterion with the settings of an :class:`AdaptiveSkipConfig`."""

    def __init__(self, config: AdaptiveSkipConfig) -> None:
        self.config = config
        self.per_sample = config.per_sample and not config.compat
        self.uses_drift = config.rule == "drift"

    def decide(self, diffs: list[Any], path: list[Any], batch: int,
               drift: list[float | None] | None = None) -> bool | list[bool]:
        cfg = self.config
        if cfg.rule in ("fixed", "drift"):
            def column(i: int) -> list[bool]:  # entries: None (computed), one flag, or a flag per sample
                return [bool(e[i]) if isinstance(e, list) else bool(e) for e in path]

            def allowed(i: int) -> bool:
                if len(path) < cfg.warmup or consecutive_skips(column(i)) >= cfg.max_skips:
                    return False
                if cfg.rule == "fixed":  # the non-adaptive baseline: reuse whenever warm-up and C_max allow
                    return True
                estimate = drift[i] if drift is not None and i < len(drift) else None
                return cfg.threshold > 0 and estimate is not None and estimate <= cfg.threshold

            out = [allowed(i) for i in range(batch if self.per_sample else 1)]
            return out if self.per_sample else out[0]
        if cfg.compat:
            return official_next_step_skipped(diffs, [bool(p) for p in path], cfg.threshold, cfg.max_skips)
        if not cfg.per_sample:
            return next_step_skipped(diffs, [bool(p) for p in path], cfg.threshold, cfg.max_skips, cfg.warmup)
        d = torch.tensor(diffs, dtype=torch.float64).reshape(len(diffs), batch)
        p = torch.tensor([row if row is not None else [False] * batch for row in path],
                         dtype=torch.bool).reshape(len(path), batch)
        return next_step_skipped_batched(d, p, cfg.threshold, cfg.max_skips, cfg.warmup).tolist()


class AdaptiveSkipHook(ModelHook):
    """Runs the denoiser or returns its cached output, per the AdaptiveDiffusion criterion."""

    _is_stateful = True

    def __init__(self, config: AdaptiveSkipConfig, pipe: Any, policy: SkipPolicy | None = None) -> None:
        super().__init__()
        self.config = config
        self.policy = CriterionPolicy(config) if policy is None else policy
        self.state = _SkipState()
        self._pipe = weakref.ref(pipe)
        self._scheduler: Any = None
        self._saved: dict[str, Any] = {}
        self._generation = 0

    # -- scheduler wiring ---------------------------------------------------------------------
    def bind_scheduler(self, scheduler: Any) -> None:
        """Wrap ``scheduler.step`` (latents, step ends) and ``scheduler.set_timesteps`` (new call)."""
        self.unbind_scheduler()
        step_fn, set_fn = scheduler.step, scheduler.set_timesteps
        hook = self

        @functools.wraps(step_fn)
        def step(*args, **kwargs):
            hook._before_step(args, kwargs)
            out = step_fn(*args, **kwargs)
            hook._after_step(scheduler, out)
            return out

        @functools.wraps(set_fn)
        def set_timesteps(*args, **kwargs):
            hook._generation += 1
            return set_fn(*args, **kwargs)

        for name, fn in (("step", step), ("set_timesteps", set_timesteps)):
            self._saved[name] = scheduler.__dict__.get(name, _MISSING)
            setattr(fn, _MARK, True)
            setattr(scheduler, name, fn)
        self._scheduler = scheduler

    def unbind_scheduler(self) -> None:
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is None:
            return
        for name, previous in self._saved.items():
            if getattr(scheduler.__dict__.get(name), _MARK, False):
                if previous is _MISSING:
                    del scheduler.__dict__[name]
                else:
                    scheduler.__dict__[name] = previous
        self._saved = {}

    def _begin_call_if_new(self) -> _SkipState:
        pipe = self._pipe()
        scheduler = getattr(pipe, "scheduler", None) if pipe is not None else self._scheduler
        new_call = self.state.generation != self._generation
        if scheduler is not None and scheduler is not self._scheduler:
            self.bind_scheduler(scheduler)  # swapped since the last call: its set_timesteps ran unwrapped
            new_call = True
        if new_call:
            self.state.reset(self._generation)
            self._publish()
            if pipe is not None:  # a step-counting cache enabled after this hook: refuse before any step runs
                self.state.active = False
                _refuse_step_counting_caches(_denoiser(pipe))
                self.state.active = True
        return self.state

    def _before_step(self, args: tuple, kwargs: dict) -> None:
        state = self.state
        if not state.active or state.generation != self._generation:
            return
        state.calls_since_step = 0
        state.timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        sample = kwargs.get("sample", args[2] if len(args) > 2 else None)
        if state.batch is None and isinstance(sample, torch.Tensor) and sample.ndim:
            self._learn_batch(sample)

    def _learn_batch(self, latent: torch.Tensor) -> None:
        """Samples of this call, from the first latents the scheduler steps on."""
        state, pipe = self.state, self._pipe()
        rows = latent.shape[0]
        if type(pipe).__name__ in CFG_DUPLICATED_LATENTS and rows % 2 == 0 and \
                torch.equal(latent[: rows // 2], latent[rows // 2:]):
            state.duplicated = True
        state.batch = state.samples_of(rows)

    def _after_step(self, scheduler: Any, out: Any) -> None:
        state = self.state
        if not state.active or state.generation != self._generation:
            return
        latent = _prev_sample(out)
        if latent is None or latent.ndim == 0:
            return
        if state.batch is None:
            self._learn_batch(latent)
        if not (self.config.compat or getattr(scheduler, "state_in_first_order", True)):
            self._publish()
            return  # first half of a second-order step: the step is not complete yet
        state.step_open = False
        level = _level_after_step(scheduler, state.timestep) if self.config.scale == "sigma" else None
        current = latent.detach().float() / level.alpha if level is not None else latent.detach().clone()
        if state.prev_latent is not None:
            if self.config.compat:
                state.diffs.append((latent - state.prev_latent).abs().mean())  # official: latents' dtype
            else:
                d = latent_difference(state.per_sample_latent(current), state.per_sample_latent(state.prev_latent),
                                      per_sample=self.config.per_sample)
                state.diffs.append(self._scaled(d, level).tolist())
        state.prev_latent, state.prev_level = current, level
        if self.policy.uses_drift:
            drift = self._drift_after_step()
            state.path.append(self.policy.decide(state.diffs, state.path, state.batch or 1, drift=drift))
        else:
            state.path.append(self.policy.decide(state.diffs, state.path, state.batch or 1))
        self._publish()

    def _scaled(self, d: torch.Tensor, level: NoiseLevel | None) -> torch.Tensor:
        """``D_j`` per unit of noise level crossed (``"sigma"`` scale); latent units where that is undefined.

        A step that crosses no noise level (PNDM redoes its first step at the same timestep) keeps
        the previous step's speed; a scheduler without a readable level keeps the raw difference,
        and the report lists those ``j`` (``unscaled``).
        """
        state = self.state
        if self.config.scale != "sigma":
            return d
        prev = state.prev_level
        if level is not None and prev is not None:
            crossed = abs(prev.sigma - level.sigma)
            if crossed > 0 and math.isfinite(crossed):
                return d / crossed
            if state.diffs:
                return torch.as_tensor(state.diffs[-1], dtype=d.dtype)
        state.unscaled.append(len(state.diffs) + 1)
        return d

    # -- the denoiser call -----------------------------------------------------------------------
    @torch.compiler.disable(recursive=False)
    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        """Run or answer one denoiser call; only the network itself runs under ``torch.compile``.

        This frame is skipped by dynamo (``recursive=False``): the bookkeeping of ``_open`` and
        ``_close`` (fully disabled) never enters a graph, so the decision's Python state (steps
        seen, paths, the generation counter) adds no guards, while ``original_forward`` is its own
        frame and is compiled when the denoiser was compiled in either order (``torch.compile``
        around it, ``module.compile()``, or the hook around a compiled module).
        """
        call = self._open(args, kwargs)
        if call.forward_args is None:
            out = None
        elif call.plain:
            out = self.fn_ref.original_forward(*call.forward_args, **call.forward_kwargs)
        else:
            out = self.policy.run(call.step, functools.partial(self.fn_ref.original_forward, *call.forward_args,
                                                                **call.forward_kwargs))
        return self._close(call, out)

    @torch.compiler.disable
    def _open(self, args: tuple, kwargs: dict) -> _Call:
        """Decide how this call is answered: pass through, compute all rows, reuse the cache, or some rows."""
        state = self._begin_call_if_new()
        if not state.active:  # after diffusers' end-of-call reset: plain pass-through
            return _Call("pass", forward_args=args, forward_kwargs=kwargs)
        position = state.calls_since_step  # 0, or 1.. for pipelines that split CFG into separate calls
        state.calls_since_step += 1
        if not state.step_open:
            state.step_open = True
            state.started += 1
            state.step_ran.append(False)
        first = _first_input(args, kwargs)
        rows = first.shape[0]
        if state.frames is None:
            state.frames = first.shape[2] if first.ndim == 5 else 1
        state.pipeline_calls += 1
        state.rows_requested += rows
        decision = state.path[-1]
        batch = state.batch or 1
        skip = [bool(s) for s in decision] if isinstance(decision, list) else [bool(decision)] * batch
        cached = state.cache.get(position)
        base = _Call("all", position=position, rows=rows, first=first, args=args, kwargs=kwargs)
        if cached is None or cached.shape[0] != rows or not any(skip) or (not all(skip) and rows % batch):
            # nothing to reuse here (or rows that cannot be split): compute all
            base.forward_args, base.forward_kwargs = args, kwargs
            base.plain = type(self.policy).run is SkipPolicy.run
            base.step = state.started - 1
            if self.policy.uses_drift and cached is not None and cached.shape[0] == rows:
                base.would = self._reused(state, position, first, args, kwargs)
            return base
        reused = self._reused(state, position, first, args, kwargs)
        if all(skip):
            base.kind, base.reused = "reuse", reused
            return base
        keep = [i for i, s in enumerate(skip) if not s]
        index = torch.tensor([i + copy * batch for copy in range(rows // batch) for i in keep], device=reused.device)
        base.kind, base.reused, base.index, base.skip = "rows", reused, index, skip
        base.forward_args, base.forward_kwargs = _rows_of(args, rows, index), _rows_of(kwargs, rows, index)
        return base

    @torch.compiler.disable
    def _close(self, call: _Call, out: Any) -> Any:
        """Record what ran, keep the cache, and build the output the pipeline gets."""
        if call.kind == "pass":
            return out
        state, position = self.state, call.position
        if call.kind == "all":
            ran: list[bool] | bool = True
            main, state.rebuild[position] = split_output(out)
            if call.would is not None:
                self._measure_drift(main, call.would, None)
            state.cache[position] = main.detach().clone()
            if self._reuse_space() is not None and main.ndim > 1 and call.first.ndim > 1 and \
                    call.first.shape[1] >= main.shape[1]:
                self._remember_input(call, main)
            state.denoiser_calls += 1
            state.rows_computed += call.rows
        elif call.kind == "reuse":
            ran, out = False, state.rebuild[position](call.reused)
        else:
            ran = [not s for s in call.skip]
            main, _ = split_output(out)
            full = call.reused
            if self.policy.uses_drift:
                self._measure_drift(main, full[call.index], [i for i, s in enumerate(call.skip) if not s])
            full[call.index] = main.to(full.dtype)
            state.cache[position] = full
            if position in state.cache_input:  # every row is now expressed at this step: its input and level
                self._remember_input(call, full)
            state.denoiser_calls += 1
            state.rows_computed += len(call.index)
            out = state.rebuild[position](full.clone())
        state.call_log.append(ran)
        state.step_ran[-1] = _union(state.step_ran[-1], ran)
        return out

    def _measure_drift(self, fresh: torch.Tensor, would: torch.Tensor, samples: list[int] | None) -> None:
        """Add this call's reuse error to the step's per-sample sums (``samples``: who ran; ``None``: all).

        Rows are ``k`` copies of the computing samples, copy-major (how ``_open`` slices them), so
        sample ``i`` owns rows ``i, i + n, ...``; a batch that does not split that way, or a shared
        path, goes into one bucket (key ``-1``).
        """
        state = self.state
        f = fresh.detach().float()
        err, size = (f - would.float()).abs(), f.abs()
        n = len(samples) if samples is not None else (state.batch or 1)
        keys = samples if samples is not None else list(range(n))
        # One host transfer a call (not two a sample): on a GPU each float() is a device sync.
        if not self.policy.per_sample or err.ndim == 0 or err.shape[0] % n:
            num, den = torch.stack([err.sum(), size.sum()]).tolist()
            buckets = [(-1, num, den)]
        else:
            e = err.reshape(err.shape[0] // n, n, -1).sum(dim=(0, 2))
            m = size.reshape(size.shape[0] // n, n, -1).sum(dim=(0, 2))
            buckets = [(k, num, den) for k, (num, den) in zip(keys, torch.stack([e, m], 1).tolist(), strict=True)]
        for key, num, den in buckets:
            state.drift_num[key] = state.drift_num.get(key, 0.0) + num
            state.drift_den[key] = state.drift_den.get(key, 0.0) + den

    def _drift_after_step(self) -> list[float | None]:
        """Close the step for rule="drift": update each sample's error rate; the estimate for the next step."""
        state = self.state
        j = len(state.path) - 1  # the step that just completed
        per_sample = self.policy.per_sample
        keys = list(range(state.batch or 1)) if per_sample else [-1]
        ran = state.step_ran[-1] if state.step_ran else True
        measured: list[float | None] = []
        for key in keys:
            ran_here = ran if isinstance(ran, bool) else (ran[key] if key >= 0 else any(ran))
            num = state.drift_num.get(key, state.drift_num.get(-1))
            den = state.drift_den.get(key, state.drift_den.get(-1))
            error = num / den if num is not None and den and math.isfinite(num / den) else None
            measured.append(error if ran_here else None)
            if not ran_here:
                continue
            if error is not None and key in state.last_run and j > state.last_run[key]:
                state.drift_rate[key] = error / (j - state.last_run[key])
            state.last_run[key] = j
        state.drift_errors.append(measured)
        state.drift_num, state.drift_den = {}, {}
        return [state.drift_rate[k] * (j + 1 - state.last_run[k]) if k in state.drift_rate else None for k in keys]

    def _reuse_space(self) -> str | None:
        """``"eps"`` or ``"x0"`` when reused outputs must be re-expressed at the new step, else ``None`` (raw).

        Raw when ``reuse="output"``, when the model already predicts the reused quantity (noise
        reuse on an epsilon model), and for flow-matching schedulers (no ``alphas_cumprod``: the
        velocity is reused as it is).
        """
        scheduler = self._scheduler
        reuse = self.config.reuse_for(scheduler)
        prediction = getattr(getattr(scheduler, "config", None), "prediction_type", None)
        if reuse == "output" or prediction not in PREDICTIONS or getattr(scheduler, "alphas_cumprod", None) is None:
            return None
        space = "eps" if reuse == "noise" else "x0"
        return None if (space, prediction) in (("eps", "epsilon"), ("x0", "sample")) else space

    def _remember_input(self, call: _Call, output: torch.Tensor) -> None:
        """Keep the latent input and noise level ``output`` was made at (what re-expressing it needs)."""
        x = call.first[:, : output.shape[1]].detach().to(output.dtype).clone()
        self.state.cache_input[call.position] = (x, self._level_now(call.args, call.kwargs))

    def _level_now(self, args: tuple, kwargs: dict) -> NoiseLevel | None:
        return call_level(self._scheduler, kwargs.get("timestep", args[1] if len(args) > 1 else None))

    def _reused(self, state: _SkipState, position: int, first: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """The cached output for this call; with ``reuse="noise"``/``"x0"`` re-expressed at this step.

        A v-prediction ``v = alpha eps - sigma x0`` depends on the noise level and the latent it was
        made at; the noise prediction ``eps = sigma x + alpha v`` is what AdaptiveDiffusion reuses, so
        it is recovered from the cached step's input and level (``from_prediction``) and turned back
        into ``v`` with this step's (``to_prediction``). Without a readable level the raw output is
        reused.
        """
        cached = state.cache[position]
        space = self._reuse_space()
        if space is None or position not in state.cache_input:
            return cached.clone()
        x_prev, level_prev = state.cache_input[position]
        level = self._level_now(args, kwargs)
        channels = cached.shape[1] if cached.ndim > 1 else 0
        if level is None or level_prev is None or first.ndim < 2 or first.shape[1] < channels or \
                x_prev.shape != cached.shape:
            return cached.clone()
        prediction = self._scheduler.config.prediction_type
        pred = from_prediction(cached.float(), x_prev.float(), level_prev, prediction, space)
        return to_prediction(pred, first[:, :channels].float(), level, prediction, space).to(cached.dtype)

    # -- diffusers' end-of-call reset and the report ---------------------------------------------
    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self._publish()
        self.state.release()
        return module

    def report(self) -> SkipReport | None:
        state, cfg = self.state, self.config
        if state.generation < 0:
            return None
        batch = state.batch or 1
        computed = [list(r) if isinstance(r, list) else [r] * batch for r in state.step_ran[: state.started]]
        diffs = [[float(d)] if not isinstance(d, list) else list(d) for d in state.diffs]
        ran = [[entry if isinstance(entry, bool) else entry[i] for entry in state.call_log] for i in range(batch)]
        return SkipReport(mode=cfg.mode, threshold=cfg.threshold, max_skips=cfg.max_skips, warmup=cfg.warmup,
                          batch_size=batch, computed=computed, diffs=diffs, pipeline_calls=state.pipeline_calls,
                          denoiser_calls=state.denoiser_calls, rows_requested=state.rows_requested,
                          rows_computed=state.rows_computed, sample_calls=[sum(r) for r in ran],
                          sample_saved=[len(r) - sum(r) for r in ran], scale=cfg.scale,
                          reuse=cfg.reuse_for(self._scheduler), unscaled=list(state.unscaled), rule=cfg.rule,
                          drift=[list(row) for row in state.drift_errors])

    def _publish(self) -> None:
        pipe = self._pipe()
        if pipe is not None:
            report = self.report()
            pipe.adaptive_skip_report = report
            publish_call_report(pipe, report)


_MISSING = object()


def _level_after_step(scheduler: Any, timestep: Any) -> NoiseLevel | None:
    """:func:`noise_level`, except PNDM's second call, which redoes step 0 and ends at ``timestep`` itself."""
    if getattr(scheduler, "counter", None) == 2 and hasattr(scheduler, "ets") and timestep is not None:
        steps = scheduler.num_inference_steps
        return noise_level(scheduler, int(timestep) + scheduler.config.num_train_timesteps // steps)
    return noise_level(scheduler, timestep)


# diffusers caches that number the denoiser calls they see and index their schedule by that number
# (MagCache's per-step magnitude ratios by ``step_index``, TaylorSeer's warm-up, intervals and
# Taylor offsets by ``current_step``). A call this hook answers from its cache never reaches their
# block hooks, so their count would fall behind the real timestep. Caches that read the step from
# the pipeline (FirstBlockCache has no count; PAB and FasterCache check ``current_timestep``,
# SeaCache its ``cache_context``) see the right step and compose.
STEP_COUNTING_CACHES = {"mag_cache_leader_block_hook": ("MagCache", "step_index"),
                        "mag_cache_block_hook": ("MagCache", "step_index"),
                        "taylorseer_cache": ("TaylorSeer", "current_step")}


def _step_counting_caches(denoiser: torch.nn.Module) -> list[tuple[str, str]]:
    found: dict[str, str] = {}
    for module in denoiser.modules():
        registry = module.__dict__.get("_diffusers_hook")
        for name in getattr(registry, "hooks", {}) or {}:
            if name in STEP_COUNTING_CACHES:
                cache, counter = STEP_COUNTING_CACHES[name]
                found[cache] = counter
    return sorted(found.items())


def _refuse_step_counting_caches(denoiser: torch.nn.Module) -> None:
    """One clear error when a cache that counts steps shares the denoiser with this hook (issue 17, item 6)."""
    found = _step_counting_caches(denoiser)
    if found:
        cache, counter = found[0]
        raise StepsaverError(
            f"adaptive skip cannot run with diffusers' {cache} on the same denoiser: {cache} counts the calls it "
            f"sees ({counter}) to know the step, and a step adaptive skip answers from its cache never reaches it, "
            f"so {cache} would apply the schedule of an earlier step. Use one of them: "
            "disable_adaptive_skip(pipe) or pipe.transformer.disable_cache()")


def _denoiser(pipe: Any) -> torch.nn.Module:
    return denoiser_of(pipe, "attach adaptive skip to")


def _hook_of(pipe: Any) -> AdaptiveSkipHook | None:
    registry = getattr(_denoiser(pipe), "_diffusers_hook", None)
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    return hook if isinstance(hook, AdaptiveSkipHook) else None


def enable_adaptive_skip(pipe: Any, config: AdaptiveSkipConfig | None = None) -> AdaptiveSkipHook:
    """Attach AdaptiveDiffusion skipping to ``pipe``'s denoiser; every later call of ``pipe`` uses it.

    After each call, :func:`skip_report` (or ``pipe.adaptive_skip_report``) tells what was skipped.
    Raises :class:`StepsaverError` on a bad config, a pipeline without ``unet``/``transformer`` or
    scheduler, or when skipping is already enabled; nothing is attached in those cases.
    """
    config = AdaptiveSkipConfig() if config is None else config
    if not isinstance(config, AdaptiveSkipConfig):
        raise StepsaverError(f"config must be an AdaptiveSkipConfig, got {type(config).__name__}")
    config.validate()
    denoiser = _denoiser(pipe)
    _refuse_step_counting_caches(denoiser)
    scheduler = getattr(pipe, "scheduler", None)
    if not (callable(getattr(scheduler, "step", None)) and callable(getattr(scheduler, "set_timesteps", None))):
        raise StepsaverError(f"{type(pipe).__name__} has no diffusers scheduler (step/set_timesteps) to follow")
    if _hook_of(pipe) is not None:
        raise StepsaverError("adaptive skip is already enabled on this pipeline; call disable_adaptive_skip(pipe) "
                             "first to change its settings")
    hook = AdaptiveSkipHook(config, pipe)
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    try:
        registry.register_hook(hook, HOOK_NAME)
        hook.bind_scheduler(scheduler)
    except Exception:
        hook.unbind_scheduler()
        if registry.get_hook(HOOK_NAME) is hook:
            _remove_hook(denoiser, registry)
        raise
    return hook


def _remove_hook(denoiser: torch.nn.Module, registry: HookRegistry) -> None:
    """Take our hook out of the registry, leaving every hook registered after it working.

    diffusers 0.42.1's ``remove_hook`` points the *next* hook's ``forward`` at our original
    forward; for a next hook with ``new_forward`` (FasterCache, FirstBlockCache, ...) that replaces
    the hook itself, which then never runs again. Its own ``forward`` is put back and our original
    forward handed to its ``original_forward`` instead (what its ``new_forward`` calls).
    """
    order = list(registry._hook_order)
    index = order.index(HOOK_NAME)
    ours = registry._fn_refs[index]
    after = registry._fn_refs[index + 1] if index + 1 < len(order) else None
    after_forward = after.forward if after is not None else None
    registry.remove_hook(HOOK_NAME, recurse=False)
    if after is not None and after.original_forward is not None:
        after.forward = after_forward
        after.original_forward = ours.original_forward if ours.original_forward is not None else ours.forward
    forward = denoiser.__dict__.get("forward")
    if not registry.hooks and getattr(forward, "__func__", None) is type(denoiser).forward and \
            getattr(forward, "__self__", None) is denoiser:
        del denoiser.__dict__["forward"]  # the bound class method the registry stored: drop the instance copy


def disable_adaptive_skip(pipe: Any) -> bool:
    """Remove the hook and the scheduler wrappers; ``False`` if skipping was not enabled.

    The denoiser's ``forward`` is the original again (the class method when no other hook is
    registered). The last call's report stays in ``pipe.adaptive_skip_report``.
    """
    hook = _hook_of(pipe)
    if hook is None:
        return False
    denoiser = _denoiser(pipe)
    registry = denoiser._diffusers_hook
    hook.unbind_scheduler()
    _remove_hook(denoiser, registry)
    hook.state.release()
    return True


def skip_enabled(pipe: Any) -> bool:
    """Whether the skip hook is attached to ``pipe``'s denoiser now (a kept report does not count)."""
    return _hook_of(pipe) is not None


def skip_report(pipe: Any) -> SkipReport | None:
    """The report of the last (or current) call of ``pipe`` with skipping enabled, ``None`` before any."""
    hook = _hook_of(pipe)
    if hook is not None:
        return hook.report()
    return getattr(pipe, "adaptive_skip_report", None)
