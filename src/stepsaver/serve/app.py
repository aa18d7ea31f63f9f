"""The HTTP service: FastAPI routes over the recommender and the generation engine.

``create_app(settings)`` builds the app; ``stepsaver serve`` runs it under uvicorn (or on Ray
Serve with ``--replicas``). Routes: ``POST /v1/recommend`` (open unless configured), ``POST
/v1/generate`` (bearer token), ``GET /healthz``, ``GET /metrics`` (Prometheus), OpenAPI at
``/docs``. The service adds no second implementation of anything: steps come from
:class:`~stepsaver.predict.StepRecommender`, skipping from :mod:`stepsaver.skip`, images from a
diffusers pipeline loaded by :func:`stepsaver.load_pipeline`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from stepsaver.errors import StepsaverError
from stepsaver.serve.engine import BatchKey, GenerationEngine, QueueFull
from stepsaver.serve.metrics import Metrics
from stepsaver.serve.schemas import (
    GenerateRequest,
    GenerateResponse,
    RecommendItem,
    RecommendRequest,
    RecommendResponse,
)
from stepsaver.serve.settings import ServeSettings
from stepsaver.skip.config import AdaptiveSkipConfig

RETRY_AFTER_S = 2


class FieldError(Exception):
    """A request field outside what the server allows (checked after pydantic): a 422 naming it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def _field_error(field: str, message: str) -> FieldError:
    return FieldError(field, message)


def create_app(settings: ServeSettings | None = None, *, engine: GenerationEngine | None = None,
               recommender: Any = None, pipe_factory: Any = None) -> FastAPI:
    """Build the app. ``engine``/``recommender``/``pipe_factory`` let tests inject small parts."""
    settings = settings or ServeSettings.load()
    if settings.token is None and not settings.insecure:
        raise StepsaverError("no token configured: set STEPSAVER_TOKEN (or `token` in the config file) so "
                             "/v1/generate is protected, or pass --insecure to serve it without one")
    metrics = Metrics()
    state: dict[str, Any] = {"recommender": recommender}
    # one recommender call at a time: ONNX Runtime already uses the cores, and 40 threadpool threads
    # each starting a 2-thread inference oversubscribe them (measured: p99 10 s at concurrency 32)
    recommend_lock = threading.Lock()

    def run_recommender(prompts: str | list[str], confidence: float | None) -> Any:
        with recommend_lock:
            return get_recommender().recommend(prompts, confidence=confidence)

    def record_batch(jobs: list, results: list) -> None:
        metrics.batch_size.observe(len(jobs))
        for r in results:
            metrics.denoiser_calls.labels("made").inc(r.denoiser_calls)
            metrics.denoiser_calls.labels("saved").inc(r.calls_saved)

    if engine is None:
        def default_factory():
            from stepsaver.pipelines import load_pipeline

            return load_pipeline(settings.model)

        engine = GenerationEngine(pipe_factory or default_factory, workers=settings.workers,
                                  queue_size=settings.queue_size, batch_size=settings.batch_size,
                                  batch_wait_ms=settings.batch_wait_ms, on_batch=record_batch)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(engine.start)
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop, True)  # drain in-flight requests

    app = FastAPI(title="stepsaver", version="0.1.0", lifespan=lifespan,
                  description="Spend only the denoising steps each prompt needs.")
    app.state.settings, app.state.engine, app.state.metrics = settings, engine, metrics

    def get_recommender():
        if state["recommender"] is None:
            from stepsaver.predict.recommender import StepRecommender

            state["recommender"] = StepRecommender.load(settings.recommender)
        return state["recommender"]

    def check_token(request: Request, required: bool) -> None:
        if not required or settings.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), settings.token.encode()):
            raise HTTPException(status_code=401, detail="missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    def generate_auth(request: Request) -> None:
        check_token(request, True)

    def recommend_auth(request: Request) -> None:
        check_token(request, settings.recommend_requires_token)

    @app.middleware("http")
    async def observe(request: Request, call_next):
        start = time.perf_counter()
        route = request.url.path if request.url.path in ("/v1/recommend", "/v1/generate", "/healthz",
                                                          "/metrics") else "other"
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            metrics.requests.labels(route, str(status)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - start)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors)
        return JSONResponse(status_code=422, content={"detail": [{k: e[k] for k in ("loc", "msg", "type")}
                                                                 for e in errors], "message": message})

    @app.exception_handler(FieldError)
    async def field_error(_request: Request, exc: FieldError) -> JSONResponse:
        return JSONResponse(status_code=422, content={
            "detail": [{"loc": ["body", exc.field], "msg": exc.message, "type": "value_error"}],
            "message": str(exc)})

    @app.exception_handler(StepsaverError)
    async def user_error(_request: Request, exc: StepsaverError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(exc), "message": str(exc)})

    from stepsaver.serve.study_pages import study_router

    app.include_router(study_router(settings.study_db))

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model, "queue_depth": engine.depth(), "busy_workers": engine.busy,
                "workers": settings.workers, "token_set": settings.token is not None}

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        metrics.queue_depth.set(engine.depth())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/recommend", response_model=RecommendResponse, dependencies=[Depends(recommend_auth)])
    def recommend(body: RecommendRequest) -> RecommendResponse:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise _field_error("prompt", "give at least one prompt")
        if len(prompts) > settings.max_recommend_batch:
            raise _field_error("prompt", f"at most {settings.max_recommend_batch} prompts per request, "
                                         f"got {len(prompts)}")
        for i, p in enumerate(prompts):
            if not p.strip():
                raise _field_error("prompt", f"prompt {i} is empty")
            if len(p) > settings.max_prompt_chars:
                raise _field_error("prompt", f"prompt {i} has {len(p)} characters; "
                                             f"allowed 1..{settings.max_prompt_chars}")
        t0 = time.perf_counter()
        recs = run_recommender(prompts, body.confidence)
        items = [RecommendItem(prompt=r.prompt, steps=r.steps, english=r.english, note=r.note,
                               probabilities={str(k): round(v, 5) for k, v in r.probabilities.items()}) for r in recs]
        return RecommendResponse(recommendations=items, milliseconds=(time.perf_counter() - t0) * 1000)

    @app.post("/v1/generate", dependencies=[Depends(generate_auth)],
              responses={200: {"content": {"image/png": {}, "application/json": {}}},
                         503: {"description": "queue full; retry after the Retry-After seconds"}})
    async def generate(body: GenerateRequest, request: Request) -> Response:
        if len(body.prompt) > settings.max_prompt_chars or not body.prompt.strip():
            raise _field_error("prompt", f"prompt must have 1..{settings.max_prompt_chars} non-blank characters")
        source = "given"
        steps = body.steps
        if steps == "auto":
            rec = await asyncio.to_thread(run_recommender, body.prompt, body.confidence)
            steps, source = rec.steps, "recommended"
            metrics.steps_saved.inc(max(0, 50 - steps))
        if steps > settings.max_steps:
            raise _field_error("steps", f"steps must be in 1..{settings.max_steps} or 'auto', got {steps}")
        skip = None
        if body.skip is not False:
            opts = body.skip if not isinstance(body.skip, bool) else None
            skip = AdaptiveSkipConfig(threshold=opts.threshold, max_skips=opts.max_skips) if opts \
                else AdaptiveSkipConfig()
        key = BatchKey(steps=steps, scheduler=body.scheduler, guidance=body.guidance, skip=skip)
        try:
            future = engine.submit(body.prompt, body.seed, key)
        except QueueFull:
            metrics.rejected.inc()
            return JSONResponse(status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)},
                                content={"detail": "generation queue is full; retry later"})
        waiter = asyncio.wrap_future(future)
        deadline = time.monotonic() + settings.request_timeout_s
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=0.1)
            if done:
                break
            if await request.is_disconnected():
                future.cancel()  # not started yet: it never runs; started: its result is dropped
                return Response(status_code=499)
            if time.monotonic() > deadline:
                future.cancel()
                return JSONResponse(status_code=504, content={"detail": f"generation took longer than "
                                                                        f"{settings.request_timeout_s} s"})
        result = waiter.result()
        buf = io.BytesIO()
        result.image.save(buf, format="PNG")
        info = {"steps": result.steps, "steps_source": source, "denoiser_calls": result.denoiser_calls,
                "denoiser_calls_saved": result.calls_saved, "seconds": round(result.seconds, 4),
                "queue_seconds": round(result.queue_seconds, 4), "batch_size": result.batch_size,
                "seed": body.seed, "scheduler": body.scheduler}
        if body.format == "json":
            return JSONResponse(GenerateResponse(image_base64=base64.b64encode(buf.getvalue()).decode(),
                                                 **info).model_dump())
        headers = {f"X-Stepsaver-{k.replace('_', '-').title()}": str(v) for k, v in info.items()}
        return Response(content=buf.getvalue(), media_type="image/png", headers=headers)

    return app
