"""``stepsaver bench serve``: a bounded load test of the service on 127.0.0.1, stopping by itself.

Starts ``stepsaver serve`` in a subprocess on a free local port (never another host), fires a
fixed number of recommend and generate requests at fixed concurrency with httpx, and reports
throughput, p50/p99 latency, 503s (the designed back-pressure) and any other 5xx (there must be
none), then stops the server.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from stepsaver.errors import StepsaverError


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the load test and the server tests bind only there)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen, timeout_s: float = 180.0) -> None:
    """Block until ``base``/healthz answers 200; a server process that exits first is an error."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            raise StepsaverError(f"server exited with code {proc.returncode}: {err}")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise StepsaverError(f"server at {base} did not become healthy within {timeout_s:.0f} s")


async def _fire(url: str, bodies: list[dict], concurrency: int, headers: dict[str, str]) -> dict[str, Any]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    codes: Counter[int] = Counter()

    async def one(client: httpx.AsyncClient, body: dict) -> None:
        async with sem:
            t0 = time.perf_counter()
            try:
                r = await client.post(url, json=body, headers=headers)
                codes[r.status_code] += 1
            except httpx.HTTPError:
                codes[-1] += 1
            lat.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, b) for b in bodies))
        wall = time.perf_counter() - t0
    arr = np.array(lat) * 1000
    ok = codes.get(200, 0)
    return {"requests": len(bodies), "concurrency": concurrency, "wall_s": wall, "ok": ok,
            "throughput_rps": ok / wall, "p50_ms": float(np.percentile(arr, 50)),
            "p99_ms": float(np.percentile(arr, 99)),
            "status_503": codes.get(503, 0), "other_5xx": sum(v for k, v in codes.items() if k >= 500 and k != 503),
            "errors": codes.get(-1, 0), "codes": {str(k): v for k, v in sorted(codes.items())}}


def bench_serve(n_recommend: int = 2000, c_recommend: int = 32, n_generate: int = 40, c_generate: int = 8,
                steps: int = 30, recommender: str = "tiny", queue_size: int = 32, batch_size: int = 8,
                out_dir: str | Path = "docs/results", name: str = "serve") -> dict[str, Any]:
    """Run the load test against a fresh local server and write ``<name>.json/.md``."""
    import httpx

    from stepsaver.measure.report import write_report
    from stepsaver.scenes import SceneGenerator

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    token = os.urandom(16).hex()
    env = {**os.environ, "STEPSAVER_TOKEN": token, "STEPSAVER_RECOMMENDER": recommender,
           "STEPSAVER_QUEUE_SIZE": str(queue_size), "STEPSAVER_BATCH_SIZE": str(batch_size),
           "STEPSAVER_MAX_RECOMMEND_BATCH": "256"}
    proc = subprocess.Popen([sys.executable, "-m", "stepsaver.cli", "serve", "--host", "127.0.0.1", "--port",
                             str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_healthy(base, proc)
        gen = SceneGenerator(seed=11, split="eval")
        prompts = [gen.sample(i).caption for i in range(max(n_recommend, n_generate))]
        httpx.post(f"{base}/v1/recommend", json={"prompt": prompts[0]}, timeout=60)  # load the recommender
        rec = asyncio.run(_fire(f"{base}/v1/recommend", [{"prompt": p} for p in prompts[:n_recommend]],
                                c_recommend, {}))
        gen_bodies = [{"prompt": p, "steps": steps, "seed": i, "format": "json"}
                      for i, p in enumerate(prompts[:n_generate])]
        generate = asyncio.run(_fire(f"{base}/v1/generate", gen_bodies, c_generate,
                                     {"Authorization": f"Bearer {token}"}))
        burst = asyncio.run(_fire(f"{base}/v1/generate", gen_bodies * 2, queue_size * 3,
                                  {"Authorization": f"Bearer {token}"}))  # over capacity: expect 503s
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
    rows = [{"load": "recommend", **rec}, {"load": f"generate ({steps} steps)", **generate},
            {"load": f"generate burst (concurrency {queue_size * 3}, queue {queue_size})", **burst}]
    for r in rows:
        r.pop("codes")
    no_5xx = all(r["other_5xx"] == 0 and r["errors"] == 0 for r in rows)
    summary = (f"Server: `stepsaver serve` (uvicorn, 1 generation worker, batch {batch_size}, queue {queue_size}) "
               f"on 127.0.0.1; embedded model; recommender `{recommender}`. Zero 5xx other than the designed 503: "
               f"**{'yes' if no_5xx else 'NO'}**. The burst row overfills the queue on purpose: its 503s carry "
               "Retry-After and every other request is served.")
    paths = write_report(name, rows, title="Service load test", summary=summary, out_dir=out_dir,
                         columns=["load", "requests", "concurrency", "ok", "throughput_rps", "p50_ms", "p99_ms",
                                  "status_503", "other_5xx", "errors", "wall_s"],
                         extra={"metrics_excerpt": [ln for ln in metrics.splitlines()
                                                    if ln.startswith("stepsaver_") and "bucket" not in ln][:40]})
    return {"rows": rows, "no_5xx": no_5xx, "summary": summary, **{k: str(v) for k, v in paths.items()}}
