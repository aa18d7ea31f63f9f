"""stepsaver.files: the JSON memo benchmarks share (computed once, merged, never torn)."""

from __future__ import annotations

import json
from pathlib import Path

from stepsaver.files import json_lookup, json_memo


def test_json_memo_computes_once_and_reuses(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "memo.json"
    calls: list[int] = []

    def compute() -> list[float]:
        calls.append(1)
        return [0.5, 0.25]

    assert json_memo(path, "a", compute) == [0.5, 0.25]
    assert json_memo(path, "a", compute) == [0.5, 0.25]
    assert len(calls) == 1
    assert json.loads(path.read_text()) == {"a": [0.5, 0.25]}


def test_json_memo_merges_entries_written_meanwhile(tmp_path: Path) -> None:
    """A second process's entry written during our compute is kept, and its value for our key wins."""
    path = tmp_path / "memo.json"
    path.write_text(json.dumps({"old": 1}))

    def compute() -> int:
        path.write_text(json.dumps({"old": 1, "other": 2, "mine": 3}))  # another process, mid-compute
        return 99

    assert json_memo(path, "mine", compute) == 3
    assert json.loads(path.read_text()) == {"old": 1, "other": 2, "mine": 3}


def test_json_memo_treats_a_torn_file_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "memo.json"
    path.write_text('{"a": [1, 2')  # a writer killed mid-file (not ours: ours replace atomically)
    assert json_memo(path, "a", lambda: {"x": 1}) == {"x": 1}
    assert json.loads(path.read_text()) == {"a": {"x": 1}}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_json_lookup_reads_without_computing(tmp_path: Path) -> None:
    path = tmp_path / "memo.json"
    assert json_lookup(path, "a") is None  # no file yet
    json_memo(path, "a", lambda: {"calls": [3, 4]})
    assert json_lookup(path, "a") == {"calls": [3, 4]} and json_lookup(path, "b") is None
    path.write_text('{"a": ')  # torn: empty, not an error
    assert json_lookup(path, "a") is None


def test_json_memo_replace_recomputes_and_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "memo.json"
    json_memo(path, "t", lambda: 1)
    json_memo(path, "u", lambda: 5)
    assert json_memo(path, "t", lambda: 2) == 1
    assert json_memo(path, "t", lambda: 2, replace=True) == 2
    assert json.loads(path.read_text()) == {"t": 2, "u": 5}
