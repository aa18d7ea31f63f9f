"""DeciDiffusion's side-by-side preference study: create pairs, store votes, compute results.

A study compares two generation configurations (``"steps=50"`` vs ``"steps=auto,skip"``) on
the same prompts and seeds. Pairs are rendered once by :func:`create_study` and kept as PNGs;
votes go to SQLite in WAL mode, one committed transaction per vote, with one vote per voter per
pair enforced by a UNIQUE constraint, so a server killed mid-study loses no stored vote. Voter
ids are issued by the server and signed with a secret kept in the same database (so every
replica and every restart agrees), see :func:`voter_secret`.
Results are win/tie/loss rates per question with Wilson 95% intervals.
"""

from __future__ import annotations

import json
import math
import secrets
import sqlite3
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stepsaver.errors import StepsaverError

QUESTIONS = {"adherence": "Which image follows the prompt better?", "quality": "Which image looks better?"}
CHOICES = ("a", "b", "same")
SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (id TEXT PRIMARY KEY, created REAL, a TEXT, b TEXT, meta TEXT);
CREATE TABLE IF NOT EXISTS pairs (id INTEGER PRIMARY KEY AUTOINCREMENT, study TEXT REFERENCES studies(id),
    prompt TEXT, seed INTEGER, image_a TEXT, image_b TEXT, info_a TEXT, info_b TEXT);
CREATE TABLE IF NOT EXISTS votes (id INTEGER PRIMARY KEY AUTOINCREMENT, study TEXT, pair INTEGER REFERENCES pairs(id),
    voter TEXT, adherence TEXT CHECK (adherence IN ('a', 'b', 'same')),
    quality TEXT CHECK (quality IN ('a', 'b', 'same')), created REAL, UNIQUE (pair, voter));
CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, value TEXT);
"""
MAX_ID = 2 ** 63 - 1  # SQLite's largest INTEGER


def connect(db: str | Path) -> sqlite3.Connection:
    """A connection in WAL mode with the schema in place (safe to call from any thread)."""
    Path(db).parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(db), timeout=30, check_same_thread=False)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")  # a committed vote survives a kill (and a power cut)
    con.executescript(SCHEMA)
    return con


def voter_secret(con: sqlite3.Connection) -> bytes:
    """The key that signs voter cookies and vote forms: made once per database, then shared."""
    with con:
        con.execute("INSERT OR IGNORE INTO secrets (name, value) VALUES ('voter', ?)", (secrets.token_hex(32),))
    return bytes.fromhex(con.execute("SELECT value FROM secrets WHERE name = 'voter'").fetchone()[0])


def parse_config(spec: str) -> dict[str, Any]:
    """``"steps=auto,skip,scheduler=euler"`` -> ``{"steps": "auto", "skip": True, "scheduler": "euler"}``."""
    from stepsaver.pipelines import scheduler_spec

    out: dict[str, Any] = {"model": "tiny", "steps": 30, "scheduler": "ddim", "skip": False, "guidance": 5.0}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, _, value = part.partition("=")
        key = key.strip()
        if key == "skip" and not value:
            out["skip"] = True
        elif key == "skip":
            out["skip"] = float(value)  # a threshold
        elif key == "steps":
            out["steps"] = value if value == "auto" else int(value)
        elif key in ("model", "scheduler"):
            out[key] = value
        elif key in ("guidance", "confidence"):
            out[key] = float(value)
        else:
            raise StepsaverError(f"study config {spec!r}: unknown key {key!r}; use model, steps, scheduler, skip, "
                                 "guidance, confidence")
    scheduler_spec(out["scheduler"])
    return out


def _render(cfg: dict[str, Any], prompts_seeds: Sequence[tuple[str, int]], folder: Path, tag: str,
            progress: bool) -> list[tuple[str, dict]]:
    from stepsaver.generation import generate
    from stepsaver.predict import step_chooser
    from stepsaver.shrink.optimize import load_model
    from stepsaver.skip import AdaptiveSkipConfig, enable_adaptive_skip

    pipe = load_model(cfg["model"], scheduler=cfg["scheduler"])
    if cfg["skip"]:
        config = AdaptiveSkipConfig() if cfg["skip"] is True else AdaptiveSkipConfig(threshold=float(cfg["skip"]))
        enable_adaptive_skip(pipe, config)
    steps = step_chooser(confidence=cfg.get("confidence")) if cfg["steps"] == "auto" else cfg["steps"]
    out = []
    for i, (prompt, seed) in enumerate(prompts_seeds):
        r = generate(pipe, prompt, steps=steps, seed=seed, guidance=cfg["guidance"])
        name = f"{i:04d}-{tag}.png"
        r.images[0].save(folder / name)
        out.append((name, r.summary()))
        if progress:
            print(f"{tag}: {i + 1}/{len(prompts_seeds)}", flush=True)
    return out


def create_study(db: str | Path, root: str | Path, a: str, b: str, prompts: Sequence[str], per_prompt: int = 1,
                 progress: bool = False) -> str:
    """Render the pairs of configs ``a`` and ``b`` (same prompt and seed) and store the study."""
    cfg_a, cfg_b = parse_config(a), parse_config(b)
    if not prompts:
        raise StepsaverError("a study needs at least one prompt")
    if per_prompt < 1:
        raise StepsaverError(f"--per-prompt must be >= 1, got {per_prompt}")
    study = uuid.uuid4().hex[:10]
    folder = Path(root) / study
    folder.mkdir(parents=True, exist_ok=True)
    items = [(p, seed) for p in prompts for seed in range(per_prompt)]
    images_a = _render(cfg_a, items, folder, "a", progress)
    images_b = _render(cfg_b, items, folder, "b", progress)
    con = connect(db)
    with con:
        con.execute("INSERT INTO studies VALUES (?, ?, ?, ?, ?)",
                    (study, time.time(), a, b, json.dumps({"root": str(folder), "a_config": cfg_a, "b_config": cfg_b})))
        for (prompt, seed), (ia, sa), (ib, sb) in zip(items, images_a, images_b, strict=True):
            con.execute("INSERT INTO pairs (study, prompt, seed, image_a, image_b, info_a, info_b) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)", (study, prompt, seed, ia, ib, json.dumps(sa), json.dumps(sb)))
    con.close()
    return study


def get_study(con: sqlite3.Connection, study: str) -> dict[str, Any]:
    row = con.execute("SELECT id, a, b, meta FROM studies WHERE id = ?", (study,)).fetchone()
    if row is None:
        raise StepsaverError(f"no study {study!r}")
    return {"id": row[0], "a": row[1], "b": row[2], **json.loads(row[3])}


def pairs(con: sqlite3.Connection, study: str) -> list[dict[str, Any]]:
    rows = con.execute("SELECT id, prompt, seed, image_a, image_b FROM pairs WHERE study = ? ORDER BY id", (study,))
    return [dict(zip(("id", "prompt", "seed", "image_a", "image_b"), r, strict=True)) for r in rows]


def next_pair(con: sqlite3.Connection, study: str, voter: str) -> dict[str, Any] | None:
    """A pair this voter has not voted on (in a per-voter shuffled order), or None when done."""
    import random

    voted = {r[0] for r in con.execute("SELECT pair FROM votes WHERE study = ? AND voter = ?", (study, voter))}
    todo = [p for p in pairs(con, study) if p["id"] not in voted]
    if not todo:
        return None
    random.Random(voter).shuffle(todo)
    return todo[0]


def left_is_a(voter: str, pair: int) -> bool:
    """The random left/right order of a pair for a voter (stable across reloads)."""
    import hashlib

    return hashlib.sha1(f"{voter}:{pair}".encode()).digest()[0] % 2 == 0


def record_vote(con: sqlite3.Connection, study: str, pair: int, voter: str, adherence: str, quality: str) -> bool:
    """Store one vote (committed before returning). False if this voter already voted on the pair."""
    if adherence not in CHOICES or quality not in CHOICES:
        raise StepsaverError(f"answers must be one of {CHOICES}")
    if isinstance(pair, bool) or not isinstance(pair, int) or not 1 <= pair <= MAX_ID:
        raise StepsaverError(f"pair {pair} is not part of study {study!r} (pair ids are 1..{MAX_ID})")
    if con.execute("SELECT 1 FROM pairs WHERE id = ? AND study = ?", (pair, study)).fetchone() is None:
        raise StepsaverError(f"pair {pair} is not part of study {study!r}")
    try:
        with con:
            con.execute("INSERT INTO votes (study, pair, voter, adherence, quality, created) VALUES (?, ?, ?, ?, ?, ?)",
                        (study, pair, voter, adherence, quality, time.time()))
    except sqlite3.IntegrityError:
        return False
    return True


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (sane at 0 and n, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def results(con: sqlite3.Connection, study: str) -> dict[str, Any]:
    """Per question: B's win / tie / loss rate against A with Wilson 95% intervals."""
    info = get_study(con, study)
    out: dict[str, Any] = {"study": study, "a": info["a"], "b": info["b"], "pairs": len(pairs(con, study))}
    votes = con.execute("SELECT adherence, quality FROM votes WHERE study = ?", (study,)).fetchall()
    out["votes"] = len(votes)
    out["voters"] = con.execute("SELECT COUNT(DISTINCT voter) FROM votes WHERE study = ?", (study,)).fetchone()[0]
    for q_index, question in enumerate(QUESTIONS):
        answers = [v[q_index] for v in votes]
        n = len(answers)
        q: dict[str, Any] = {"question": QUESTIONS[question], "n": n}
        for outcome, choice in (("b_wins", "b"), ("tie", "same"), ("a_wins", "a")):
            k = answers.count(choice)
            lo, hi = wilson(k, n)
            q[outcome] = {"count": k, "rate": k / n if n else 0.0, "ci95": [lo, hi]}
        out[question] = q
    return out


def results_plot(res: dict[str, Any]) -> bytes:
    """Bar chart of win/tie/loss rates with their intervals, as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    outcomes = (("b_wins", f"B wins ({res['b']})"), ("tie", "same"), ("a_wins", f"A wins ({res['a']})"))
    width = 0.25
    for j, (key, label) in enumerate(outcomes):
        rates = [res[q][key]["rate"] for q in QUESTIONS]
        err = [[r - res[q][key]["ci95"][0] for r, q in zip(rates, QUESTIONS, strict=True)],
               [res[q][key]["ci95"][1] - r for r, q in zip(rates, QUESTIONS, strict=True)]]
        ax.bar([i + j * width for i in range(len(QUESTIONS))], rates, width, yerr=err, capsize=3, label=label)
    ax.set_xticks([i + width for i in range(len(QUESTIONS))], ["follows the prompt", "looks better"])
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of votes (95% CI)")
    ax.set_title(f"study {res['study']}: {res['votes']} votes", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
