"""The generation engine: a bounded queue, a pool of pipeline threads, and request batching.

Generation is seconds of compute, so it never runs on the web server's event loop: requests
become :class:`Job` futures in a bounded queue (full -> :class:`QueueFull`, which the app turns
into a 503 with Retry-After), and each worker thread owns one pipeline. A worker takes a job,
then waits up to ``batch_wait_ms`` for more jobs with the same :class:`BatchKey` (steps,
scheduler, guidance, skip settings) and runs them as one pipeline call, one generator per prompt,
so every image equals what a lone request with that seed would get; with Skip on, the hook's
per-sample paths let each prompt skip its own steps inside the batch. A job cancelled before a
worker starts it (client gone, timeout) is dropped without running.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from stepsaver.skip.config import AdaptiveSkipConfig


class QueueFull(Exception):
    """The generate queue is at capacity."""


@dataclass(frozen=True)
class BatchKey:
    steps: int
    scheduler: str = "ddim"
    guidance: float = 5.0
    skip: AdaptiveSkipConfig | None = None


@dataclass
class Job:
    prompt: str
    seed: int
    key: BatchKey
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)


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
    """``submit(prompt, seed, key) -> Future[JobResult]``; ``start()`` / ``stop(drain=True)``."""

    def __init__(self, pipe_factory: Callable[[], Any], workers: int = 1, queue_size: int = 32,
                 batch_size: int = 8, batch_wait_ms: float = 20.0,
                 on_batch: Callable[[list[Job], list[JobResult]], None] | None = None) -> None:
        self.pipe_factory = pipe_factory
        self.workers = workers
        self.batch_size = batch_size
        self.batch_wait = batch_wait_ms / 1000
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self.on_batch = on_batch
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._busy = 0
        self._lock = threading.Lock()
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
        self._stop.set()
        for t in self._threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        while True:  # anything left (no drain, or timeout): fail it rather than leave it hanging
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("server shutting down"))

    # ---- work -----------------------------------------------------------------------------------
    def submit(self, prompt: str, seed: int, key: BatchKey) -> Future:
        job = Job(prompt, seed, key)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        return job.future

    def depth(self) -> int:
        return self.jobs.qsize()

    @property
    def busy(self) -> int:
        return self._busy

    def _next_batch(self, pending: collections.deque[Job]) -> list[Job]:
        first = pending.popleft() if pending else None
        while first is None and not self._stop.is_set():
            try:
                first = self.jobs.get(timeout=0.1)
            except queue.Empty:
                continue
        if first is None:
            return []
        batch = [first]
        deadline = time.perf_counter() + self.batch_wait
        for job in list(pending):
            if len(batch) < self.batch_size and job.key == first.key:
                pending.remove(job)
                batch.append(job)
        while len(batch) < self.batch_size:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                job = self.jobs.get(timeout=left)
            except queue.Empty:
                break
            (batch if job.key == first.key else pending).append(job)
        return [j for j in batch if j.future.set_running_or_notify_cancel()]  # drop cancelled jobs

    def _loop(self, pipe) -> None:
        pending: collections.deque[Job] = collections.deque()
        while not self._stop.is_set() or pending:
            batch = self._next_batch(pending)
            if not batch:
                if self._stop.is_set():
                    return
                continue
            with self._lock:
                self._busy += 1
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
                with self._lock:
                    self._busy -= 1

    def _run(self, pipe, batch: list[Job]) -> list[JobResult]:
        from stepsaver.generation import generate_images
        from stepsaver.pipelines import make_scheduler
        from stepsaver.skip import disable_adaptive_skip, enable_adaptive_skip

        key = batch[0].key
        base = self._base_schedulers.setdefault(id(pipe), pipe.scheduler.config)
        pipe.scheduler = make_scheduler(key.scheduler, base)
        if key.skip is not None:
            enable_adaptive_skip(pipe, key.skip)
        started = time.perf_counter()
        try:
            made = generate_images(pipe, [j.prompt for j in batch], steps=key.steps, seeds=[j.seed for j in batch],
                                   guidance=key.guidance)
        finally:
            if key.skip is not None:
                disable_adaptive_skip(pipe)
        seconds = time.perf_counter() - started
        return [JobResult(r.image, key.steps, r.denoiser_calls, r.extra.get("denoiser_calls_saved", 0), seconds,
                          started - job.enqueued, len(batch)) for job, r in zip(batch, made, strict=True)]
