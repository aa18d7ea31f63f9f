"""The HTTP service: FastAPI routes over the recommender and the generation engine.

``create_app(settings)`` builds the app; ``stepsaver serve`` runs it under uvicorn (or on Ray
Serve with ``--replicas``). Routes: ``POST /v1/recommend`` (open unless configured), ``POST
/v1/generate`` (bearer token), ``GET /healthz``, ``GET /metrics`` (Prometheus), OpenAPI at
``/docs``. The service adds no second implementation of anything: steps come from
:class:`~stepsaver.predict.StepRecommender`, skipping from :mod:`stepsaver.skip`, images from a
diffusers pipeline loaded by :func:`stepsaver.load_pipeline` (or an optimised folder, through
:func:`stepsaver.shrink.optimize.load_model`).

Every request passes :class:`ObserveMiddleware`, plain ASGI (not ``@app.middleware``, which
hides the client's disconnect from the routes): it counts each request by route and status, and
refuses a body over ``max_body_bytes`` with a 413 before reading it. A generate request whose
client leaves is answered 499 (counted, never sent): its job is dropped if it has not started,
and a running batch stops once every client in it has left or timed out (504).
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

from stepsaver.calibrate.space import skip_config
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
ROUTES = ("/v1/recommend", "/v1/generate", "/healthz", "/metrics")


class ObserveMiddleware:
    """Pure ASGI: metrics per route and status, and the request body limit (413).

    A body announced (Content-Length) or found (chunked) to be over ``max_body_bytes`` is a 413
    before any of it is parsed; otherwise the body is read here (at most the limit) and handed to
    the app, and every later ``receive`` goes to the server untouched, so ``http.disconnect``
    reaches the routes. A request that ends without a response (the client left) counts as 499.
    """

    def __init__(self, app: Any, metrics: Metrics, max_body_bytes: int) -> None:
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status: list[int] = []

        async def send_observed(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        code = 500  # what an exception escaping the app becomes
        try:
            body = await self._read_body(scope, receive)
            if isinstance(body, int):
                code = body
                if code == 413:
                    await self._too_large(scope, receive, send_observed)
                return
            replayed = False

            async def receive_body() -> dict:
                nonlocal replayed
                if body is not None and not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, receive_body, send_observed)
            code = status[0] if status else 499
        finally:
            self.metrics.requests.labels(route, str(status[0] if status else code)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)

    async def _read_body(self, scope: dict, receive: Any) -> bytes | int | None:
        """The whole body (None: the app reads it itself, GET/HEAD); 413 over the limit; 499 if the client left."""
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return None
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                if int(length) > self.max_body_bytes:
                    return 413
            except ValueError:
                pass  # the server already refuses a malformed Content-Length
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return 499
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return 413
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _too_large(self, scope: dict, receive: Any, send: Any) -> None:
        message = (f"request body is larger than {self.max_body_bytes} bytes (max_body_bytes); "
                   "send fewer or shorter prompts")
        response = JSONResponse(status_code=413, content={"detail": message, "message": message},
                                headers={"Connection": "close"})
        await response(scope, receive, send)


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
        raise StepsaverError("no token configured (STEPSAVER_TOKEN is unset or blank): set STEPSAVER_TOKEN (or "
                             "`token` in the config file) so /v1/generate is protected, or pass --insecure to serve "
                             "it without one")
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

    calibrated = None
    if settings.calibration:
        from stepsaver.calibrate import load_calibrated

        calibrated = load_calibrated(settings.calibration)  # a missing or foreign file fails at start-up

    if engine is None:
        def default_factory():
            from stepsaver.shrink.optimize import load_model

            if calibrated is None:
                return load_model(settings.model)
            pipe = load_model(settings.model, scheduler=None)
            calibrated.check(pipe)  # refuses another model's calibration before serving anything
            calibrated.attach_cache(pipe)  # diffusers' caches stay on; Skip is set per batch
            return pipe

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
    app.add_middleware(ObserveMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes)
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

    def abandon(future: Any) -> str:
        """Give up on a job: 'queued' (it never runs), 'running' (its batch stops if nobody else waits), 'done'."""
        if hasattr(engine, "abandon"):
            return engine.abandon(future)
        return "queued" if future.cancel() else "running"

    def generate_auth(request: Request) -> None:
        check_token(request, True)

    def recommend_auth(request: Request) -> None:
        check_token(request, settings.recommend_requires_token)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{**e, "msg": "unknown field; see /docs for the fields of this request"
                   if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")} for e in exc.errors()]
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
        return {"status": "ok", "model": settings.model, "queue_depth": engine.depth(),
                "queue_size": settings.queue_size, "busy_workers": engine.busy, "workers": settings.workers,
                "token_set": settings.token is not None}

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        metrics.queue_depth.set(engine.depth())
        metrics.queue_size.set(settings.queue_size)
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
        steps, confidence, scheduler, guidance = body.steps, body.confidence, body.scheduler, body.guidance
        given = body.model_fields_set
        if calibrated is not None:  # what the request leaves out, the calibration decides
            c = calibrated.candidate
            if "steps" not in given:
                steps, confidence = ("auto", c.confidence) if c.confidence is not None else (c.steps, confidence)
            scheduler = scheduler if "scheduler" in given else c.scheduler
            guidance = guidance if "guidance" in given else calibrated.guidance
        if steps == "auto":
            rec = await asyncio.to_thread(run_recommender, body.prompt, confidence)
            steps, source = rec.steps, "recommended"
            metrics.steps_saved.inc(max(0, 50 - steps))
        if steps > settings.max_steps:
            raise _field_error("steps", f"steps must be in 1..{settings.max_steps} or 'auto', got {steps}")
        skip = None
        if calibrated is not None and "skip" not in given:
            skip = skip_config(calibrated.candidate.skip)
        elif body.skip is not False:
            opts = body.skip if not isinstance(body.skip, bool) else None
            skip = AdaptiveSkipConfig(threshold=opts.threshold, max_skips=opts.max_skips, rule=opts.rule) if opts \
                else AdaptiveSkipConfig()
        key = BatchKey(steps=steps, scheduler=scheduler, guidance=guidance, skip=skip)
        try:
            future = engine.submit(body.prompt, body.seed, key)
        except QueueFull:
            metrics.rejected.inc()
            full = f"generation queue is full ({settings.queue_size} waiting); retry later"
            return JSONResponse(status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)},
                                content={"detail": full, "message": full})
        waiter = asyncio.wrap_future(future)
        deadline = time.monotonic() + settings.request_timeout_s
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=0.1)
            if done:
                break
            if await request.is_disconnected():
                metrics.abandoned.labels("disconnect", abandon(future)).inc()
                waiter.cancel()  # its outcome (a result, or JobAbandoned) is nobody's to read
                return Response(status_code=499)  # nobody reads it; the metrics count it
            if time.monotonic() > deadline:
                where = abandon(future)
                if where == "done":  # finished just now: answer it after all
                    break
                metrics.abandoned.labels("timeout", where).inc()
                waiter.cancel()
                late = f"generation took longer than {settings.request_timeout_s} s"
                return JSONResponse(status_code=504, content={"detail": late, "message": late})
        result = await waiter
        buf = io.BytesIO()
        result.image.save(buf, format="PNG")
        info = {"steps": result.steps, "steps_source": source, "denoiser_calls": result.denoiser_calls,
                "denoiser_calls_saved": result.calls_saved, "seconds": round(result.seconds, 4),
                "queue_seconds": round(result.queue_seconds, 4), "batch_size": result.batch_size,
                "seed": body.seed, "scheduler": scheduler}
        if body.format == "json":
            return JSONResponse(GenerateResponse(image_base64=base64.b64encode(buf.getvalue()).decode(),
                                                 **info).model_dump())
        headers = {f"X-Stepsaver-{k.replace('_', '-').title()}": str(v) for k, v in info.items()}
        return Response(content=buf.getvalue(), media_type="image/png", headers=headers)

    return app
