"""Serve: every route, auth, validation, the bounded queue, batching, cancellation, metrics."""

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from stepsaver.errors import StepsaverError
from stepsaver.serve import BatchKey, GenerationEngine, QueueFull, ServeSettings, create_app
from tests.helpers import GatedPipe

TOKEN = "s3cret-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def client(embedded_pipe, trained_recommender):
    from stepsaver.predict import StepRecommender

    settings = ServeSettings(token=TOKEN, batch_size=4, batch_wait_ms=200, max_steps=20, max_recommend_batch=8)
    app = create_app(settings, recommender=StepRecommender.load(trained_recommender[0]),
                     pipe_factory=lambda: embedded_pipe)
    with TestClient(app) as c:
        yield c


def test_health_docs_and_openapi(client):
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/recommend", "/v1/generate", "/healthz", "/metrics"} <= set(paths)


def test_recommend_one_and_many(client):
    r = client.post("/v1/recommend", json={"prompt": "a cat on background 3"})
    assert r.status_code == 200
    body = r.json()
    assert body["recommendations"][0]["steps"] in (10, 30, 60) and body["milliseconds"] >= 0
    r = client.post("/v1/recommend", json={"prompt": ["a cat", "a dog and a boat"], "confidence": 0.9})
    assert [x["prompt"] for x in r.json()["recommendations"]] == ["a cat", "a dog and a boat"]


@pytest.mark.parametrize("body, field", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({"prompt": ["a"] * 9}, "prompt"),
    ({"prompt": "a cat", "confidence": 1.5}, "confidence"),
    ({}, "prompt"),
])
def test_recommend_bad_input_is_422_naming_the_field(client, body, field):
    r = client.post("/v1/recommend", json=body)
    assert r.status_code == 422
    assert field in str(r.json())


def test_generate_needs_the_token(client):
    body = {"prompt": "a cat on the left, yellow background", "steps": 2}
    assert client.post("/v1/generate", json=body).status_code == 401
    assert client.post("/v1/generate", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = client.post("/v1/generate", json=body, headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (64, 64)
    assert r.headers["X-Stepsaver-Steps"] == "2" and r.headers["X-Stepsaver-Denoiser-Calls"] == "2"


def test_generate_json_auto_steps_and_skip(client, embedded_pipe):
    from stepsaver import generate

    r = client.post("/v1/generate", headers=AUTH, json={"prompt": "a big cat, blue background", "steps": 12,
                                                         "skip": {"rule": "criterion", "threshold": 0.05,
                                                                  "max_skips": 2},
                                                         "format": "json", "seed": 3})
    assert r.status_code == 200
    body = r.json()
    assert body["denoiser_calls"] + body["denoiser_calls_saved"] == 12 and body["denoiser_calls_saved"] > 0
    r = client.post("/v1/generate", headers=AUTH, json={"prompt": "a big cat, blue background", "steps": 12,
                                                         "skip": {"rule": "fixed", "max_skips": 1},
                                                         "format": "json"})
    assert r.status_code == 200 and r.json()["denoiser_calls_saved"] == 4  # steps 5, 7, 9, 11 reuse
    r = client.post("/v1/generate", headers=AUTH, json={"prompt": "a cat on background 1", "steps": "auto",
                                                         "format": "json"})
    auto = r.json()
    assert r.status_code == 422 or auto["steps_source"] == "recommended"  # recommended 30/60 > max_steps=20 -> 422
    r = client.post("/v1/generate", headers=AUTH, json={"prompt": "a red apple", "steps": 3, "seed": 5,
                                                         "format": "json"})
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["image_base64"]))))
    ref = np.asarray(generate(embedded_pipe, "a red apple", steps=3, seed=5).images[0])
    assert np.abs(img.astype(int) - ref.astype(int)).max() <= 1  # the service draws what generate draws


@pytest.mark.parametrize("body, field", [
    ({"prompt": "a cat", "steps": 0}, "steps"),
    ({"prompt": "a cat", "steps": 21}, "steps"),
    ({"prompt": "a cat", "steps": "many"}, "steps"),
    ({"prompt": "a cat", "scheduler": "magic"}, "scheduler"),
    ({"prompt": "a cat", "guidance": -1}, "guidance"),
    ({"prompt": "a cat", "skip": {"threshold": -0.1}}, "threshold"),
    ({"prompt": "a cat", "format": "gif"}, "format"),
    ({"prompt": ""}, "prompt"),
])
def test_generate_bad_input_is_422_naming_the_field(client, body, field):
    r = client.post("/v1/generate", json=body, headers=AUTH)
    assert r.status_code == 422, r.text
    assert field in r.json()["message"] or field in str(r.json()["detail"])


def test_concurrent_compatible_requests_are_batched_and_match_single_calls(client, embedded_pipe):
    from stepsaver import generate

    prompts = ["a cat, blue background", "a dog, red background", "a car, green background", "a fish"]

    def call(i):
        return client.post("/v1/generate", headers=AUTH, json={"prompt": prompts[i], "steps": 3, "seed": i,
                                                               "format": "json"}).json()

    with ThreadPoolExecutor(4) as pool:
        out = list(pool.map(call, range(4)))
    assert max(o["batch_size"] for o in out) > 1
    for i, o in enumerate(out):
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(o["image_base64"]))))
        ref = np.asarray(generate(embedded_pipe, prompts[i], steps=3, seed=i).images[0])
        assert np.abs(img.astype(int) - ref.astype(int)).max() <= 2


def test_metrics_count_routes_and_denoiser_calls(client):
    client.post("/v1/recommend", json={"prompt": "a cat"})
    text = client.get("/metrics").text
    assert 'stepsaver_requests_total{route="/v1/recommend",status="200"}' in text
    assert "stepsaver_request_seconds_bucket" in text and "stepsaver_queue_depth" in text
    assert 'stepsaver_denoiser_calls_total{kind="made"}' in text


def test_refuses_to_start_generate_without_token():
    with pytest.raises(StepsaverError, match="STEPSAVER_TOKEN"):
        create_app(ServeSettings(token=None))


def test_full_queue_is_503_and_cancelled_jobs_never_run(embedded_pipe):
    pipe = GatedPipe(embedded_pipe, open_gate=False, wait_s=10)
    engine = GenerationEngine(lambda: pipe, workers=1, queue_size=1, batch_size=1, batch_wait_ms=0)
    app = create_app(ServeSettings(insecure=True, queue_size=1), engine=engine)
    key = BatchKey(steps=2)
    with TestClient(app) as c:
        running = engine.submit("a cat", 0, key)
        for _ in range(100):
            if pipe.calls:
                break
            time.sleep(0.02)
        queued = engine.submit("a dog", 0, key)  # fills the queue (size 1)
        with pytest.raises(QueueFull):
            engine.submit("a fish", 0, key)
        r = c.post("/v1/generate", json={"prompt": "a bird", "steps": 2})
        assert r.status_code == 503 and r.headers["Retry-After"]
        assert queued.cancel()  # the client went away before a worker took it
        pipe.gate.set()
        assert running.result(timeout=30).steps == 2
        time.sleep(0.3)
        assert [p for call in pipe.calls for p in call] == ["a cat"]  # the cancelled job never ran
        assert "stepsaver_rejected_total 1.0" in c.get("/metrics").text


def test_ray_serve_replica_answers(tmp_path):
    """`stepsaver serve --replicas 1` deploys the same app on a local Ray Serve and answers."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    from stepsaver.bench.load import free_port, wait_healthy

    port = free_port()
    env = {**os.environ, "STEPSAVER_STUDY_DB": str(tmp_path / "s.sqlite"), "RAY_ADDRESS": "local"}
    proc = subprocess.Popen([sys.executable, "-m", "stepsaver.cli", "serve", "--replicas", "1", "--insecure",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        r = httpx.post(f"{base}/v1/generate", json={"prompt": "a cat, blue background", "steps": 2,
                                                    "format": "json"}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["denoiser_calls"] == 2
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
