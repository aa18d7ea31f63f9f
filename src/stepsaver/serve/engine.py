"""The generation engine: a bounded queue, a pool of pipeline threads, and request batching.

Generation is seconds of compute, so it never runs on the web server's event loop: requests
become :class:`Job` futures in one bounded waiting list shared by all workers (full ->
:class:`QueueFull`, which the app turns into a 503 with Retry-After), and each worker thread
owns one pipeline. A worker takes the oldest job, then waits up to ``batch_wait_ms`` for more
jobs with the same :class:`BatchKey` (steps, scheduler, guidance, skip settings) and runs them
as one pipeline call, one generator per prompt, so every image equals what a lone request with
that seed would get; with Skip on, the hook's per-sample paths let each prompt skip its own
steps inside the batch. Jobs with other settings stay in the shared list for any worker.

Everything that waits is counted: :meth:`GenerationEngine.depth` is every job accepted and not
yet running (in the list or held by a worker gathering a batch), and it never exceeds
``queue_size``. :meth:`GenerationEngine.abandon` is how a request gives up (client gone,
timeout): a job not yet running is removed and never runs; a running batch whose every client
gave up stops at its next denoiser call, so abandoned work cannot hold a worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from stepsaver.calibrate.space import OWN as OWN_SCHEDULER
from stepsaver.skip.config import AdaptiveSkipConfig


class QueueFull(Exception):
    """The generate queue is at capacity."""


class JobAbandoned(Exception):
    """Every client of a running batch gave up, so the batch was stopped before it finished."""


@dataclass(frozen=True)
class BatchKey:
    steps: int
    scheduler: str = OWN_SCHEDULER
    guidance: float = 5.0
    skip: AdaptiveSkipConfig | None = None


class JobFuture(Future):
    """A job's future; ``job`` lets :meth:`GenerationEngine.abandon` find a running job."""

    job: Job | None = None


@dataclass(eq=False)
class Job:
    prompt: str
    seed: int
    key: BatchKey
    future: Future = field(default_factory=JobFuture)
    enqueued: float = field(default_factory=time.perf_counter)
    abandoned: bool = False  # its client left while it ran (see GenerationEngine.abandon)

    def __post_init__(self) -> None:
        self.future.job = self


@dataclass
class JobResult:
    image: Any
    steps: int
    denoiser_calls: int
    calls_saved: int
    seconds: float
    queue_seconds: float
    batch_size: int


class GenerationEngine:
    """``submit(prompt, seed, key) -> Future[JobResult]``; ``abandon(future)``; ``start()`` / ``stop(drain=True)``."""

    def __init__(self, pipe_factory: Callable[[], Any], workers: int = 1, queue_size: int = 32,
                 batch_size: int = 8, batch_wait_ms: float = 20.0,
                 on_batch: Callable[[list[Job], list[JobResult]], None] | None = None) -> None:
        self.pipe_factory = pipe_factory
        self.workers = workers
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.batch_wait = batch_wait_ms / 1000
        self.on_batch = on_batch
        self._waiting: list[Job] = []  # oldest first; every worker takes from here
        self._gathering = 0  # jobs a worker took and holds while it waits for batch mates
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._busy = 0
        self._base_schedulers: dict[int, Any] = {}

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        pipes = [self.pipe_factory() for _ in range(self.workers)]  # load before accepting work
        for i, pipe in enumerate(pipes):
            pipe.set_progress_bar_config(disable=True)
            t = threading.Thread(target=self._loop, args=(pipe,), name=f"stepsaver-gen-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, drain: bool = True, timeout: float = 60.0) -> None:
        """Stop the workers; with ``drain`` the queued and running jobs finish first."""
        deadline = time.monotonic() + timeout
        while drain and (self.depth() or self._busy) and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._cond:
            self._stop.set()
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        with self._cond:  # anything left (no drain, or timeout): fail it rather than leave it hanging
            left, self._waiting = self._waiting, []
        for job in left:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("server shutting down"))

    # ---- work -----------------------------------------------------------------------------------
    def submit(self, prompt: str, seed: int, key: BatchKey) -> Future:
        job = Job(prompt, seed, key)
        job.future.add_done_callback(lambda _f: self._forget(job))
        with self._cond:
            if self._stop.is_set() or len(self._waiting) + self._gathering >= self.queue_size:
                raise QueueFull
            self._waiting.append(job)
            self._cond.notify()
        return job.future

    def abandon(self, future: Future) -> str:
        """The client of ``future`` gave up. Returns where the job was: ``"queued"`` (removed, it
        never runs), ``"running"`` (its batch stops at the next denoiser call once every job in it
        was abandoned) or ``"done"`` (finished already; its result stands)."""
        if future.cancel():  # not started: the done callback takes it off the list
            return "queued"
        if future.done():
            return "done"
        job = getattr(future, "job", None)
        if job is not None:
            job.abandoned = True
        return "running"

    def _forget(self, job: Job) -> None:
        if job.future.cancelled():
            with self._cond:
                if job in self._waiting:
                    self._waiting.remove(job)

    def depth(self) -> int:
        """Jobs accepted and not yet running: never more than ``queue_size``."""
        with self._cond:
            return len(self._waiting) + self._gathering

    @property
    def busy(self) -> int:
        return self._busy

    def _next_batch(self) -> list[Job]:
        with self._cond:
            while not self._waiting:
                if self._stop.is_set():
                    return []
                self._cond.wait(0.1)
            if self._stop.is_set():
                return []
            first = self._waiting.pop(0)
            batch = [first]
            self._gathering += 1
            deadline = time.perf_counter() + self.batch_wait
            try:
                while True:
                    for job in [j for j in self._waiting if j.key == first.key][:self.batch_size - len(batch)]:
                        self._waiting.remove(job)
                        batch.append(job)
                        self._gathering += 1
                    left = deadline - time.perf_counter()
                    if len(batch) >= self.batch_size or left <= 0 or self._stop.is_set():
                        break
                    self._cond.wait(left)
            finally:
                self._gathering -= len(batch)
            started = [j for j in batch if j.future.set_running_or_notify_cancel()]  # drop cancelled jobs
            if started:
                self._busy += 1  # in the same step as they leave depth(): drain never sees a gap
            return started

    def _loop(self, pipe) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                if self._stop.is_set():
                    return
                continue
            try:
                results = self._run(pipe, batch)
                for job, res in zip(batch, results, strict=True):
                    job.future.set_result(res)
                if self.on_batch:
                    self.on_batch(batch, results)
            except Exception as exc:  # noqa: BLE001 - every waiting client gets the error, the worker lives on
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
            finally:
                with self._cond:
                    self._busy -= 1

    def _run(self, pipe, batch: list[Job]) -> list[JobResult]:
        from stepsaver.calls import denoiser_of
        from stepsaver.generation import generate_images
        from stepsaver.pipelines import make_scheduler
        from stepsaver.skip import disable_adaptive_skip, enable_adaptive_skip

        def stop_when_abandoned(_module, _args) -> None:
            if all(j.abandoned for j in batch):
                raise JobAbandoned(f"all {len(batch)} clients of this batch gave up; stopped")

        key = batch[0].key
        base = self._base_schedulers.setdefault(id(pipe), pipe.scheduler)
        # "own": the scheduler the model was loaded with (a calibration may choose it, e.g. flow matching)
        pipe.scheduler = (type(base).from_config(base.config) if key.scheduler == OWN_SCHEDULER
                          else make_scheduler(key.scheduler, base.config))
        if key.skip is not None:
            enable_adaptive_skip(pipe, key.skip)
        started = time.perf_counter()
        handle = denoiser_of(pipe).register_forward_pre_hook(stop_when_abandoned)
        try:
            made = generate_images(pipe, [j.prompt for j in batch], steps=key.steps, seeds=[j.seed for j in batch],
                                   guidance=key.guidance)
        finally:
            handle.remove()
            if key.skip is not None:
                disable_adaptive_skip(pipe)
        seconds = time.perf_counter() - started
        return [JobResult(r.image, key.steps, r.denoiser_calls, r.extra.get("denoiser_calls_saved", 0), seconds,
                          started - job.enqueued, len(batch)) for job, r in zip(batch, made, strict=True)]
