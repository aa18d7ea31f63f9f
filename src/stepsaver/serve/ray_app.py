"""The same app on Ray Serve: N replicas, each with its own pipeline, batched by ``@serve.batch``.

Nothing is reimplemented: each replica builds :func:`~stepsaver.serve.app.create_app` with a
:class:`RayBatchEngine` in place of the thread-pool engine, and Ray Serve's own request batching
gathers concurrent generate requests; a gathered batch is split by :class:`BatchKey` and each
group runs through :meth:`GenerationEngine._run`, the code the plain server runs.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from ray import serve

from stepsaver.serve.engine import BatchKey, GenerationEngine, Job, JobResult, QueueFull
from stepsaver.serve.settings import ServeSettings


class RayBatchEngine:
    """Engine interface (start/stop/submit/depth/busy) over ``@serve.batch``."""

    def __init__(self, settings: ServeSettings, pipe_factory: Any = None) -> None:
        from stepsaver.shrink.optimize import load_model

        self.settings = settings
        self.pipe_factory = pipe_factory or (lambda: load_model(settings.model))
        self.runner = GenerationEngine(self.pipe_factory)
        self.pipe = None
        self.inflight = 0
        self._lock = asyncio.Lock()
        self._batched.set_max_batch_size(settings.batch_size)
        self._batched.set_batch_wait_timeout_s(settings.batch_wait_ms / 1000)

    def start(self) -> None:
        if self.pipe is None:
            self.pipe = self.pipe_factory()
            self.pipe.set_progress_bar_config(disable=True)

    def stop(self, drain: bool = True, timeout: float = 60.0) -> None:  # Ray drains replicas itself
        return None

    def depth(self) -> int:
        return self.inflight

    @property
    def busy(self) -> int:
        return int(self.inflight > 0)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _batched(self, jobs: list[Job]) -> list[JobResult]:
        groups: dict[BatchKey, list[int]] = collections.defaultdict(list)
        for i, job in enumerate(jobs):
            groups[job.key].append(i)
        results: list[JobResult | None] = [None] * len(jobs)
        async with self._lock:  # one pipeline per replica: run groups one after another
            for idx in groups.values():
                group = [jobs[i] for i in idx]
                out = await asyncio.to_thread(self.runner._run, self.pipe, group)
                for i, r in zip(idx, out, strict=True):
                    results[i] = r
        return results  # type: ignore[return-value]

    def submit(self, prompt: str, seed: int, key: BatchKey) -> asyncio.Task:
        if self.inflight >= self.settings.queue_size:
            raise QueueFull
        self.inflight += 1

        async def run() -> JobResult:
            try:
                return await self._batched(Job(prompt, seed, key))
            finally:
                self.inflight -= 1

        return asyncio.ensure_future(run())


def serve_on_ray(settings: ServeSettings, replicas: int, host: str, port: int, address: str | None = None) -> None:
    """Deploy ``replicas`` copies of the app on Ray Serve and block until interrupted."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    config = settings.model_dump()

    def build_app():  # runs on each replica: its own engine, pipeline and app
        from stepsaver.serve.app import create_app

        s = ServeSettings(**config)
        return create_app(s, engine=RayBatchEngine(s))

    deployment = serve.deployment(name="stepsaver", num_replicas=replicas,
                                  max_ongoing_requests=settings.queue_size + settings.batch_size)(
        serve.ingress(build_app)())
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment.bind(), blocking=True)
