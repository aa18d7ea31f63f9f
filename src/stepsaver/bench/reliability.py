"""``stepsaver bench reliability``: every bad input and fault we know of, tried, with what happened.

Each case feeds one hostile or careless input to the real entry point a user would hit: the CLI
(in-process through Typer's runner), the HTTP service (FastAPI's test client over the real app
with the shipped recommender and model), the prompt-file reader, the label store and the
instruments. The outcome is classified from what came back, not from what was expected:

* ``clear error``: exit code 2 with one line naming the problem, or an HTTP 4xx with a body;
* ``accepted``: the input was taken (exit 0 / 2xx) — right for the control cases only;
* ``5xx`` and ``traceback``: the failures this project promises never to show.

``rows lost`` counts label rows written before a fault (a torn last line, a second writer) that
a later reader no longer sees. The report is docs/results/reliability.{json,md}.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GOOD = ("accepted",)
REFUSED = ("clear error",)


@dataclass
class Case:
    area: str
    what: str
    run: Callable[[Path], tuple[str, str]]  # -> (outcome, detail)
    want: tuple[str, ...] = REFUSED
    rows_lost: Callable[[Path], int] | None = None


def _cli(*args: Any) -> tuple[str, str]:
    from typer.testing import CliRunner

    from stepsaver.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    text = (r.output or "").strip()
    if r.exception is not None and not isinstance(r.exception, SystemExit) or "Traceback" in text:
        return "traceback", f"{type(r.exception).__name__}: {r.exception}"[:160]
    last = text.splitlines()[-1] if text else ""
    if r.exit_code == 2:
        return "clear error", f"exit 2: {last[:160]}"
    if r.exit_code == 0:
        return "accepted", "exit 0"
    return "traceback", f"exit {r.exit_code}: {last[:160]}"


def _call(fn: Callable[[], Any]) -> tuple[str, str]:
    from stepsaver.errors import StepsaverError

    try:
        fn()
    except StepsaverError as exc:
        return "clear error", str(exc)[:160]
    except Exception as exc:  # noqa: BLE001 - that is what is being measured
        return "traceback", f"{type(exc).__name__}: {exc}"[:160]
    return "accepted", "no error"


def _prompt_file(name: str, text: str) -> Callable[[Path], tuple[str, str]]:
    def run(tmp: Path) -> tuple[str, str]:
        from stepsaver.predict.prompts import read_prompts

        (tmp / name).write_text(text)
        return _call(lambda: read_prompts(tmp / name))
    return run


def _generate(*extra: Any) -> Callable[[Path], tuple[str, str]]:
    return lambda tmp: _cli("generate", "a cat, blue background", "--steps", 2, "--out", tmp / "x.png", *extra)


def _label_setup(tmp: Path) -> tuple[Path, Path]:
    prompts = tmp / "p.txt"
    prompts.write_text("a cat, blue background\n")
    return prompts, tmp / "labels"


def _corrupt_meta(tmp: Path) -> tuple[str, str]:
    prompts, out = _label_setup(tmp)
    out.mkdir()
    (out / "meta.json").write_text('{"model": "tiny", "ste')
    return _cli("label", "--prompts", prompts, "--out", out, "--steps", "2,3")


def _second_writer(tmp: Path) -> tuple[str, str]:
    from stepsaver.files import exclusive_folder

    prompts, out = _label_setup(tmp)
    with exclusive_folder(out, "labelling run"):
        return _cli("label", "--prompts", prompts, "--out", out, "--steps", "2,3")


def _torn_line(tmp: Path) -> tuple[str, str]:
    from stepsaver.predict.label import LabelConfig, LabelStore

    store = LabelStore(tmp / "torn", LabelConfig(steps=(2, 3)))
    rows = [{"prompt": f"p{i}", "label_converged": 2} for i in range(3)]
    store.path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"prompt": "p3", "lab')  # killed mid-line
    return _call(lambda: LabelStore(tmp / "torn", LabelConfig(steps=(2, 3))))


def _torn_rows_lost(tmp: Path) -> int:
    from stepsaver.predict.label import LabelConfig, LabelStore

    return 3 - len(LabelStore(tmp / "torn", LabelConfig(steps=(2, 3))).done)


def _instrument(kind: str) -> Callable[[Path], tuple[str, str]]:
    def run(_tmp: Path) -> tuple[str, str]:
        import numpy as np
        import torch

        from stepsaver.measure import fid, quality

        if kind == "fid-one-image":
            one = np.zeros((1, 64, 64, 3), np.uint8)
            return _call(lambda: fid.fid_kid(one, one))
        if kind == "psnr-shapes":
            return _call(lambda: quality.psnr(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 4, 4)))
        raise ValueError(kind)
    return run


def cli_and_file_cases() -> list[Case]:
    """The CLI, prompt-file, label-store and instrument cases (no model is loaded by any of them)."""
    return [
        Case("cli", "generate --guidance nan", _generate("--guidance", "nan")),
        Case("cli", "generate --guidance inf", _generate("--guidance", "inf")),
        Case("cli", "generate --guidance-rescale nan", _generate("--guidance-rescale", "nan")),
        Case("cli", "generate --skip --threshold nan", _generate("--skip", "--threshold", "nan")),
        Case("cli", "generate --seed 1e23 (as an integer)", _generate("--seed", 10**23)),
        Case("cli", "generate --seed -1", _generate("--seed", -1)),
        Case("cli", "generate --steps 0", _generate("--steps", 0)),
        Case("cli", "generate --steps many", _generate("--steps", "many")),
        Case("cli", "generate --scheduler nope", _generate("--scheduler", "nope")),
        Case("cli", "generate prompt with a lone surrogate",
             lambda tmp: _cli("generate", "a \ud800", "--steps", 2, "--out", tmp / "x.png")),
        Case("cli", "generate --out under a file", lambda tmp: (tmp / "f").write_text("x") and _cli(
            "generate", "a cat", "--steps", 2, "--out", tmp / "f" / "x.png")),
        Case("cli", "generate --out /proc/x.png", lambda tmp: _cli("generate", "a cat", "--steps", 2, "--out",
                                                                   "/proc/x.png")),
        Case("cli", "generate --out an existing directory", lambda tmp: (tmp / "d.png").mkdir() or _cli(
            "generate", "a cat", "--steps", 2, "--out", tmp / "d.png")),
        Case("cli", "generate --model ./missing-folder", _generate("--model", "./missing-folder")),
        Case("cli", "recommend a lone surrogate", lambda tmp: _cli("recommend", "a \ud800 cat")),
        Case("files", "CSV with an unclosed quote", _prompt_file("open.csv", 'prompt\n"a cat\na dog\na bird\n')),
        Case("files", "CSV field over 131 KB", _prompt_file("big.csv", "prompt\n" + "x" * 140_000 + "\n")),
        Case("files", 'JSONL {"prompt": null}', _prompt_file("null.jsonl", '{"prompt": null}\n')),
        Case("files", "JSONL row without the prompt column",
             _prompt_file("nocol.jsonl", '{"prompt": "a"}\n{"other": "b"}\n')),
        Case("files", "JSON list with a number in it", _prompt_file("n.json", '["a cat", 3]')),
        Case("files", "corrupt parquet", _prompt_file("bad.parquet", "not parquet")),
        Case("files", "prompts file that is not UTF-8", lambda tmp: (tmp / "l.txt").write_bytes(b"caf\xe9\n") and
             _call(lambda: __import__("stepsaver.predict.prompts", fromlist=["x"]).read_prompts(tmp / "l.txt"))),
        Case("label", "label with a truncated meta.json", _corrupt_meta),
        Case("label", "a second label run on the same --out", _second_writer),
        Case("label", "resume after a kill mid-line (torn last row)", _torn_line, GOOD, _torn_rows_lost),
        Case("measure", "FID of one image", _instrument("fid-one-image")),
        Case("measure", "PSNR of images of different sizes", _instrument("psnr-shapes")),
        Case("control", "generate 2 steps on the embedded model", _generate(), GOOD),
    ]


def service_cases() -> list[Case]:
    """Requests against the real app (shipped recommender and model), bad ones and a control."""
    big = "x" * (30 * 2**20)
    posts: list[tuple[str, str, Any, tuple[str, ...]]] = [
        ("/v1/recommend", "prompt with a lone surrogate", '{"prompt": "a \\ud800"}', REFUSED),
        ("/v1/recommend", "a list holding a lone surrogate", '{"prompt": ["a cat", "a \\ud800"]}', REFUSED),
        ("/v1/recommend", "a 30 MB body", '{"prompt": "' + big + '"}', REFUSED),
        ("/v1/recommend", "confidence: true", {"prompt": "a cat", "confidence": True}, REFUSED),
        ("/v1/recommend", "control: one prompt", {"prompt": "a cat, blue background"}, GOOD),
        ("/v1/generate", "steps: true", {"prompt": "a cat", "steps": True}, REFUSED),
        ("/v1/generate", 'steps: "2"', {"prompt": "a cat", "steps": "2"}, REFUSED),
        ("/v1/generate", 'skip: "yes"', {"prompt": "a cat", "steps": 2, "skip": "yes"}, REFUSED),
        ("/v1/generate", "unknown field width", {"prompt": "a cat", "steps": 2, "width": 512}, REFUSED),
        ("/v1/generate", "guidance NaN", '{"prompt": "a cat", "steps": 2, "guidance": NaN}', REFUSED),
        ("/v1/generate", "steps 10**6", {"prompt": "a cat", "steps": 10**6}, REFUSED),
        ("/v1/generate", "control: 2 steps", {"prompt": "a cat, blue background", "steps": 2}, GOOD),
    ]
    token = "reliability-check-token-0123456789"

    def post(path: str, body: Any) -> Callable[[Path], tuple[str, str]]:
        def run(_tmp: Path) -> tuple[str, str]:
            client = _client(token)
            headers = {"Authorization": f"Bearer {token}", "content-type": "application/json"}
            r = client.post(path, content=body if isinstance(body, str) else json.dumps(body), headers=headers)
            kind = "accepted" if r.status_code < 400 else "clear error" if r.status_code < 500 else "5xx"
            return kind, f"HTTP {r.status_code}: {r.text[:120]}"
        return run

    def empty_token(_tmp: Path) -> tuple[str, str]:
        from stepsaver.serve.app import create_app
        from stepsaver.serve.settings import ServeSettings

        return _call(lambda: create_app(ServeSettings.load(token="   ")))

    def huge_pair(_tmp: Path) -> tuple[str, str]:
        client = _client(token)
        r = client.post("/study/x/vote", data={"pair": "99999999999999999999999", "left": "a", "adherence": "a",
                                               "quality": "a", "token": "t"})
        kind = "accepted" if r.status_code < 400 else "clear error" if r.status_code < 500 else "5xx"
        return kind, f"HTTP {r.status_code}: {r.text[:120]}"

    return ([Case("serve", "start with a whitespace token", empty_token)]
            + [Case("serve", f"POST {path} {what}", post(path, body), want) for path, what, body, want in posts]
            + [Case("serve", "study vote with pair=99999999999999999999999", huge_pair)])


_CLIENT: dict[str, Any] = {}


def _client(token: str):
    """One TestClient over the real app for all service cases (its lifespan starts the engine)."""
    if "client" not in _CLIENT:
        from fastapi.testclient import TestClient

        from stepsaver.serve.app import create_app
        from stepsaver.serve.settings import ServeSettings

        settings = ServeSettings.load(token=token, study_db=str(Path(tempfile.mkdtemp()) / "study.sqlite"))
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        client.__enter__()
        _CLIENT["client"] = client
    return _CLIENT["client"]


def bench_reliability(out_dir: str | Path = "docs/results", name: str = "reliability",
                      service: bool = True) -> dict[str, Any]:
    """Run every case; rows + counts, written to ``out_dir/name.{json,md}``."""
    from stepsaver.measure.report import write_report

    cases = cli_and_file_cases() + (service_cases() if service else [])
    rows = []
    try:
        for case in cases:
            with tempfile.TemporaryDirectory() as tmp:
                outcome, detail = case.run(Path(tmp))
                lost = case.rows_lost(Path(tmp)) if case.rows_lost else 0
            rows.append({"area": case.area, "input": case.what, "outcome": outcome,
                         "as_designed": outcome in case.want, "rows_lost": lost, "detail": detail})
    finally:
        client = _CLIENT.pop("client", None)
        if client is not None:
            client.__exit__(None, None, None)
    counts = {"inputs_tried": len(rows), "clear_errors": sum(r["outcome"] == "clear error" for r in rows),
              "accepted": sum(r["outcome"] == "accepted" for r in rows),
              "5xx": sum(r["outcome"] == "5xx" for r in rows),
              "tracebacks": sum(r["outcome"] == "traceback" for r in rows),
              "rows_lost": sum(r["rows_lost"] for r in rows),
              "not_as_designed": sum(not r["as_designed"] for r in rows)}
    summary = (f"{counts['inputs_tried']} inputs tried: {counts['clear_errors']} clear errors, "
               f"{counts['accepted']} accepted (controls and the torn-line resume), {counts['5xx']} 5xx, "
               f"{counts['tracebacks']} tracebacks, {counts['rows_lost']} label rows lost; "
               f"{counts['not_as_designed']} cases not as designed.")
    paths = write_report(name, rows, out_dir=out_dir, title="Reliability: bad input and faults",
                         summary=summary, extra={"counts": counts})
    return {"rows": rows, "counts": counts, "summary": summary, **paths}
