"""The service under hostile or careless input (issue 18, items 1-9): each test failed before its fix."""

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from stepsaver.bench.load import free_port
from stepsaver.errors import StepsaverError
from stepsaver.serve import BatchKey, GenerationEngine, QueueFull, ServeSettings, create_app
from stepsaver.serve import study as st
from tests.helpers import GatedPipe

TOKEN = "hardening-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _wait_for(cond, timeout=10.0, step=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


@contextlib.contextmanager
def _live(app):
    """``app`` under a real uvicorn on a free port, in a thread (real sockets, real disconnects)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert _wait_for(lambda: server.started, timeout=60)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(60)


def _make_study(db, root):
    """A study of two pairs inserted directly (no rendering): what the vote routes need."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("0-a.png", "0-b.png"):
        Image.new("RGB", (8, 8)).save(root / name)
    con = st.connect(db)
    sid = uuid.uuid4().hex[:10]
    with con:
        con.execute("INSERT INTO studies VALUES (?, ?, ?, ?, ?)", (sid, time.time(), "steps=4", "steps=2",
                                                                    json.dumps({"root": str(root)})))
        for i in range(2):
            con.execute("INSERT INTO pairs (study, prompt, seed, image_a, image_b, info_a, info_b) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)", (sid, f"prompt {i}", i, "0-a.png", "0-b.png", "{}", "{}"))
    con.close()
    return sid


def _votes(db, sid):
    con = st.connect(db)
    try:
        return con.execute("SELECT COUNT(*) FROM votes WHERE study = ?", (sid,)).fetchone()[0]
    finally:
        con.close()


@pytest.fixture(scope="module")
def hard(tmp_path_factory, embedded_pipe):
    from stepsaver.predict.recommender import StepRecommender

    root = tmp_path_factory.mktemp("hard")
    db = root / "study.sqlite"
    sid = _make_study(db, root / "img")
    settings = ServeSettings(token=TOKEN, max_steps=20, study_db=str(db), max_recommend_batch=8)
    app = create_app(settings, recommender=StepRecommender.load("tiny"), pipe_factory=lambda: embedded_pipe)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c, db, sid


# ---- 1: an empty or short token ------------------------------------------------------------------

@pytest.mark.parametrize("token", ["", "   ", "\t\n"])
def test_blank_token_counts_as_missing(token, tmp_path):
    assert ServeSettings(token=token).token is None
    with pytest.raises(StepsaverError, match="STEPSAVER_TOKEN"):
        create_app(ServeSettings(token=token, study_db=str(tmp_path / "s.sqlite")))
    app = create_app(ServeSettings(token=token, insecure=True, study_db=str(tmp_path / "s.sqlite")),
                     engine=GenerationEngine(lambda: None))
    assert TestClient(app).get("/healthz").json()["token_set"] is False  # the banner and /healthz agree


@pytest.mark.parametrize("token", ["short", "x" * 15, "has a space in it ok", "ünïcödé-token-0123456"])
def test_short_or_unprintable_token_is_refused(token, monkeypatch):
    monkeypatch.setenv("STEPSAVER_TOKEN", token)
    with pytest.raises(StepsaverError, match="token") as info:
        ServeSettings.load()
    assert "\n" not in str(info.value) and token not in str(info.value)  # one line, never echoes the secret


@pytest.mark.parametrize("token", ["", "  "])
def test_serve_refuses_a_blank_token_at_start_up(token, tmp_path):
    env = {**os.environ, "STEPSAVER_TOKEN": token, "STEPSAVER_STUDY_DB": str(tmp_path / "s.sqlite")}
    try:
        proc = subprocess.run([sys.executable, "-m", "stepsaver.cli", "serve", "--port", str(free_port())], env=env,
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("`stepsaver serve` started with a blank token")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "STEPSAVER_TOKEN" in lines[0], proc.stderr


# ---- 2 and 7 (socket level): a client that leaves, a body that is too big ------------------------

@pytest.fixture(scope="module")
def live(embedded_pipe, tmp_path_factory):
    pipe = GatedPipe(embedded_pipe)
    engine = GenerationEngine(lambda: pipe, workers=1, queue_size=4, batch_size=1, batch_wait_ms=0)
    db = tmp_path_factory.mktemp("live") / "s.sqlite"
    app = create_app(ServeSettings(token=TOKEN, study_db=str(db), max_body_bytes=65536), engine=engine)
    with _live(app) as port:
        yield port, pipe, engine
    pipe.gate.set()


def _send(port, head: bytes, body: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(head + body)
    return s


def _generate_head(length: int) -> bytes:
    return (f"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode()


def test_client_that_leaves_has_its_queued_job_dropped_and_499_counted(live):
    port, pipe, engine = live
    pipe.gate.clear()
    held = engine.submit("hold the worker", 0, BatchKey(steps=2))
    try:
        assert _wait_for(lambda: "hold the worker" in pipe.prompts())
        body = json.dumps({"prompt": "nobody waits for me", "steps": 2}).encode()
        s = _send(port, _generate_head(len(body)), body)
        assert _wait_for(lambda: engine.depth() == 1)  # queued behind the held job
        s.close()  # the client leaves
        metric = 'stepsaver_requests_total{route="/v1/generate",status="499"} 1.0'
        assert _wait_for(lambda: metric in httpx.get(f"http://127.0.0.1:{port}/metrics").text, timeout=5), \
            "the disconnect was not seen"
        assert engine.depth() == 0
    finally:
        pipe.gate.set()
    assert held.result(timeout=30).steps == 2
    time.sleep(0.3)
    assert "nobody waits for me" not in pipe.prompts()  # the job of the client that left never ran


def test_oversized_body_is_413_before_it_is_read(live):
    port, _pipe, _engine = live
    s = _send(port, _generate_head(30_000_000), b'{"prompt": "')  # announces 30 MB, sends 12 bytes
    try:
        reply = s.recv(4096).decode()  # answered without waiting for the rest of the body
    finally:
        s.close()
    assert reply.startswith("HTTP/1.1 413"), reply[:200]
    assert "max_body_bytes" in reply


# ---- 3: everything that waits is bounded and counted ---------------------------------------------

def test_queue_bound_holds_for_jobs_with_other_settings(embedded_pipe, tmp_path):
    pipe = GatedPipe(embedded_pipe)
    pipe.gate.clear()
    engine = GenerationEngine(lambda: pipe, workers=1, queue_size=2, batch_size=4, batch_wait_ms=1000)
    engine.start()
    accepted = []
    try:
        for i in range(10):  # each with its own guidance: none can join another's batch
            try:
                accepted.append(engine.submit(f"p{i}", 0, BatchKey(steps=2, guidance=1.0 + i)))
            except QueueFull:
                pass
            time.sleep(0.02)
            assert engine.depth() <= 2
        outstanding = sum(not f.done() for f in accepted)
        assert outstanding == engine.depth() == len(accepted) == 2, (outstanding, engine.depth())
        app = create_app(ServeSettings(insecure=True, queue_size=2, study_db=str(tmp_path / "s.sqlite")),
                         engine=engine)
        c = TestClient(app)  # no lifespan: the engine is already started
        health = c.get("/healthz").json()
        assert health["queue_depth"] == 2 and health["queue_size"] == 2
        text = c.get("/metrics").text
        assert "stepsaver_queue_depth 2.0" in text and "stepsaver_queue_size 2.0" in text
    finally:
        pipe.gate.set()
        engine.stop()
    assert all(f.result(timeout=30).steps == 2 for f in accepted)


# ---- 4: a timed-out request does not make the next one time out ----------------------------------

def test_timed_out_request_does_not_cascade(embedded_pipe, tmp_path):
    from stepsaver.calls import denoiser_of

    handle = denoiser_of(embedded_pipe).register_forward_pre_hook(lambda *_: time.sleep(0.2))  # 0.2 s a step
    settings = ServeSettings(insecure=True, workers=1, batch_size=1, batch_wait_ms=0, request_timeout_s=3,
                             study_db=str(tmp_path / "s.sqlite"))
    try:
        with TestClient(create_app(settings, pipe_factory=lambda: embedded_pipe)) as c:
            slow = c.post("/v1/generate", json={"prompt": "a slow cat", "steps": 60})  # ~12 s of work
            assert slow.status_code == 504
            t0 = time.monotonic()
            quick = c.post("/v1/generate", json={"prompt": "a quick dog", "steps": 2})
            assert quick.status_code == 200, (quick.status_code, quick.text[:200])
            assert time.monotonic() - t0 < 3
            text = c.get("/metrics").text
            assert 'stepsaver_abandoned_total{reason="timeout",stage="running"} 1.0' in text
    finally:
        handle.remove()


# ---- 5: lone surrogates ----------------------------------------------------------------------------

@pytest.mark.parametrize("path, raw", [
    ("/v1/recommend", '{"prompt": "a \\ud800"}'),
    ("/v1/recommend", '{"prompt": ["a cat", "b \\udfff c"]}'),
    ("/v1/generate", '{"prompt": "a \\ud800 cat", "steps": 2}'),
])
def test_lone_surrogate_is_422(hard, path, raw):
    c, _db, _sid = hard
    r = c.post(path, content=raw, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 422, (r.status_code, r.text[:300])
    assert "prompt" in r.json()["message"] and "surrogate" in r.json()["message"]


def test_lone_surrogate_in_validate_prompts_and_the_cli():
    from typer.testing import CliRunner

    from stepsaver.cli import app
    from stepsaver.predict.recommender import validate_prompts

    with pytest.raises(StepsaverError, match="surrogate"):
        validate_prompts(["fine", "a \udcff b"])
    result = CliRunner().invoke(app, ["recommend", "a \udcff"])  # what argv holds for the byte 0xff
    assert result.exit_code == 2, result.output


# ---- 6: huge pair numbers ----------------------------------------------------------------------------

def test_huge_pair_is_422_not_500(hard):
    c, db, sid = hard
    r = c.post(f"/study/{sid}/vote", data={"pair": "99999999999999999999999", "left": "a", "adherence": "left",
                                           "quality": "same"})
    assert r.status_code == 422, (r.status_code, r.text[:300])
    assert "pair" in r.text
    assert c.get(f"/study/{sid}/image/99999999999999999999999/a").status_code == 404
    con = st.connect(db)
    with pytest.raises(StepsaverError, match="pair"):
        st.record_vote(con, sid, 10 ** 23, "v", "a", "a")


# ---- 7: request body size ------------------------------------------------------------------------

def test_big_body_is_413(hard):
    c, _db, _sid = hard
    body = b'{"prompt": "' + b"x" * 3_000_000 + b'"}'
    r = c.post("/v1/recommend", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes" in r.json()["message"]

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(30):
            yield b"x" * 100_000
        yield b'"}'

    r = c.post("/v1/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert 'route="/v1/recommend",status="413"' in c.get("/metrics").text


# ---- 8: strict types, unknown fields, non-finite numbers ------------------------------------------

@pytest.mark.parametrize("path, raw, field", [
    ("/v1/generate", {"prompt": "a cat", "steps": True}, "steps"),
    ("/v1/generate", {"prompt": "a cat", "steps": "2"}, "steps"),
    ("/v1/generate", {"prompt": "a cat", "steps": 2.0}, "steps"),
    ("/v1/generate", {"prompt": "a cat", "steps": 2, "skip": "yes"}, "skip"),
    ("/v1/generate", {"prompt": "a cat", "steps": 2, "skip": 1}, "skip"),
    ("/v1/generate", {"prompt": "a cat", "steps": 2, "seed": "3"}, "seed"),
    ("/v1/generate", {"prompt": "a cat", "steps": 2, "guidance": "5"}, "guidance"),
    ("/v1/generate", {"prompt": "a cat", "steps": 2, "guidance": True}, "guidance"),
    ("/v1/generate", {"prompt": "a cat", "steps": 2, "skip": {"threshold": "0.1"}}, "threshold"),
    ("/v1/generate", {"prompt": "a cat", "steps": 2, "skip": {"max_skips": 2, "window": 3}}, "window"),
    ("/v1/generate", {"prompt": "a cat", "steps": 2, "skip": {"rule": "sometimes"}}, "rule"),
    ("/v1/generate", {"prompt": "a cat", "steps": 2, "width": 512, "height": 512}, "width"),
    ("/v1/generate", '{"prompt": "a cat", "steps": 2, "skip": {"threshold": Infinity}}', "threshold"),
    ("/v1/generate", '{"prompt": "a cat", "steps": 2, "guidance": NaN}', "guidance"),
    ("/v1/recommend", {"prompt": "a cat", "confidence": True}, "confidence"),
    ("/v1/recommend", {"prompt": "a cat", "confidence": "0.5"}, "confidence"),
    ("/v1/recommend", '{"prompt": "a cat", "confidence": NaN}', "confidence"),
    ("/v1/recommend", {"prompt": "a cat", "steps": 10}, "steps"),
    ("/v1/recommend", {"prompt": 5}, "prompt"),
])
def test_loose_types_and_unknown_fields_are_422(hard, path, raw, field):
    c, _db, _sid = hard
    content = raw if isinstance(raw, str) else json.dumps(raw)
    r = c.post(path, content=content, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 422, (r.status_code, r.text[:300])
    assert field in r.json()["message"], r.json()["message"]


def test_strict_fields_still_take_what_they_should(hard):
    c, _db, _sid = hard
    r = c.post("/v1/generate", headers=AUTH, json={"prompt": "a cat", "steps": 2, "guidance": 5, "seed": 1,
                                                    "skip": {"threshold": 0, "max_skips": 1}, "format": "json"})
    assert r.status_code == 200, r.text[:300]  # an int where a float goes is fine
    assert c.post("/v1/recommend", json={"prompt": ["a", "b"], "confidence": 1}).status_code == 200


# ---- 9: one vote per voter per pair, also without a cookie -----------------------------------------

def _form(page: str) -> dict:
    return {k: re.search(rf"name='{k}' value='([^']*)'", page).group(1) for k in ("pair", "left", "token")}


def test_cookieless_votes_are_refused(hard):
    c, db, sid = hard
    before = _votes(db, sid)
    pair = st.pairs(st.connect(db), sid)[0]["id"]
    for _ in range(5):
        c.cookies.clear()
        r = c.post(f"/study/{sid}/vote", data={"pair": pair, "left": "a", "adherence": "left", "quality": "same",
                                               "token": "x"}, follow_redirects=False)
        assert r.status_code == 403, (r.status_code, r.text[:200])
    assert _votes(db, sid) == before


def test_one_vote_per_page_and_voter(hard):
    c, db, sid = hard
    c.cookies.clear()
    before = _votes(db, sid)
    form = _form(c.get(f"/study/{sid}").text)  # sets the voter cookie
    vote = {**form, "adherence": "left", "quality": "same"}
    assert c.post(f"/study/{sid}/vote", data=vote, follow_redirects=False).status_code == 303
    assert c.post(f"/study/{sid}/vote", data=vote, follow_redirects=False).status_code == 303  # a resubmit...
    assert _votes(db, sid) == before + 1  # ...is not a second vote
    other = _form(c.get(f"/study/{sid}").text)  # the next pair's page
    assert other["pair"] != form["pair"]
    stolen = {**other, "token": form["token"], "adherence": "right", "quality": "same"}
    assert c.post(f"/study/{sid}/vote", data=stolen, follow_redirects=False).status_code == 403
    missing = {k: v for k, v in other.items() if k != "token"} | {"adherence": "left", "quality": "left"}
    assert c.post(f"/study/{sid}/vote", data=missing, follow_redirects=False).status_code in (403, 422)
    voter = c.cookies.get("stepsaver_voter")
    c.cookies.clear()
    c.cookies.set("stepsaver_voter", "forged-" + voter[7:])  # a voter id the server never issued
    assert c.post(f"/study/{sid}/vote", data={**other, "adherence": "left", "quality": "left"},
                  follow_redirects=False).status_code == 403
    assert _votes(db, sid) == before + 1
