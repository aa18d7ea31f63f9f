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
* **The report records what ran.** A step the policy marked skippable but that had to compute
  (no cached output yet, or another hook changed the row count) is reported as computed.
"""

from __future__ import annotations

import dataclasses
import functools
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
    latent_difference,
    next_step_skipped,
    next_step_skipped_batched,
    official_next_step_skipped,
)

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
        if self.threshold == 0 or self.max_skips == 0:
            return "calls saved 0 because threshold or max_skips is 0 (skipping off)"
        if self.steps <= self.warmup:
            return (f"calls saved 0 because {self.steps} steps <= warmup {self.warmup}: the first {self.warmup} "
                    "steps always run the denoiser")
        return (f"calls saved 0 because no step after the {self.warmup} warm-up steps met the threshold "
                f"{self.threshold}: few-step schedulers (LCM, Turbo, 4-8 steps) move the latent too much per step "
                "for the third-order test; raise the threshold or use more steps")

    def summary(self) -> dict[str, Any]:
        note = {"note": self.why_no_savings()} if not self.calls_saved else {}
        return {**note, "mode": self.mode, "threshold": self.threshold, "max_skips": self.max_skips,
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
        self.step_ran: list[list[bool] | bool] = []  # per started step: which samples ran the network
        self.prev_latent: torch.Tensor | None = None
        self.pipeline_calls = self.denoiser_calls = self.rows_requested = self.rows_computed = 0
        self.call_log: list[list[bool] | bool] = []  # per pipeline call: rows computed, per sample or for all

    def release(self) -> None:
        self.cache, self.rebuild, self.prev_latent = {}, {}, None
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


class SkipPolicy:
    """What the hook asks at each step: which samples reuse the cache next, and how to run a call.

    ``decide`` sees the history after a completed scheduler step: ``diffs`` (``D_1..D_j``, per
    sample lists, floats, or 0-dim tensors in compat mode), ``path`` (the decisions so far; ``None``
    = computed) and ``batch`` (the latents' batch). It returns one flag for the whole batch or a
    list with one flag per sample (``True`` = reuse). ``run(step, forward)`` makes one full network
    call of step ``step``; the default just calls ``forward()``.
    """

    per_sample: bool = False

    def decide(self, diffs: list[Any], path: list[Any], batch: int) -> bool | list[bool]:
        raise NotImplementedError

    def run(self, step: int, forward: Callable[[], Any]) -> Any:
        return forward()


class CriterionPolicy(SkipPolicy):
    """AdaptiveDiffusion's third-order criterion with the settings of an :class:`AdaptiveSkipConfig`."""

    def __init__(self, config: AdaptiveSkipConfig) -> None:
        self.config = config
        self.per_sample = config.per_sample and not config.compat

    def decide(self, diffs: list[Any], path: list[Any], batch: int) -> bool | list[bool]:
        cfg = self.config
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
        return self.state

    def _before_step(self, args: tuple, kwargs: dict) -> None:
        state = self.state
        if not state.active or state.generation != self._generation:
            return
        state.calls_since_step = 0
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
        if state.prev_latent is not None:
            if self.config.compat:
                state.diffs.append((latent - state.prev_latent).abs().mean())  # official: latents' dtype
            else:
                d = latent_difference(state.per_sample_latent(latent), state.per_sample_latent(state.prev_latent),
                                      per_sample=self.config.per_sample)
                state.diffs.append(d.tolist())
        state.prev_latent = latent.detach().clone()
        state.path.append(self.policy.decide(state.diffs, state.path, state.batch or 1))
        self._publish()

    # -- the denoiser call -----------------------------------------------------------------------
    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        state = self._begin_call_if_new()
        if not state.active:  # after diffusers' end-of-call reset: plain pass-through
            return self.fn_ref.original_forward(*args, **kwargs)
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
        if cached is None or cached.shape[0] != rows or not any(skip) or (not all(skip) and rows % batch):
            ran: list[bool] | bool = True  # nothing to reuse here (or rows that cannot be split): compute all
            out = self._compute(state, position, rows, args, kwargs)
        elif all(skip):
            ran, out = False, state.rebuild[position](cached.clone())
        else:
            ran = [not s for s in skip]
            out = self._compute_rows(state, position, rows, skip, args, kwargs)
        state.call_log.append(ran)
        state.step_ran[-1] = _union(state.step_ran[-1], ran)
        return out

    def _compute(self, state: _SkipState, position: int, rows: int, args: tuple, kwargs: dict) -> Any:
        out = self.policy.run(state.started - 1, lambda: self.fn_ref.original_forward(*args, **kwargs))
        main, state.rebuild[position] = split_output(out)
        state.cache[position] = main.detach().clone()
        state.denoiser_calls += 1
        state.rows_computed += rows
        return out

    def _compute_rows(self, state: _SkipState, position: int, rows: int, skip: list[bool], args: tuple,
                      kwargs: dict) -> Any:
        batch = len(skip)
        keep = [i for i, s in enumerate(skip) if not s]
        cached = state.cache[position]
        index = torch.tensor([i + copy * batch for copy in range(rows // batch) for i in keep], device=cached.device)
        out = self.fn_ref.original_forward(*_rows_of(args, rows, index), **_rows_of(kwargs, rows, index))
        main, _ = split_output(out)
        full = cached.clone()
        full[index] = main.to(full.dtype)
        state.cache[position] = full
        state.denoiser_calls += 1
        state.rows_computed += len(index)
        return state.rebuild[position](full.clone())

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
                          sample_saved=[len(r) - sum(r) for r in ran])

    def _publish(self) -> None:
        pipe = self._pipe()
        if pipe is not None:
            report = self.report()
            pipe.adaptive_skip_report = report
            publish_call_report(pipe, report)


_MISSING = object()


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
