"""`stepsaver bench models`: two checkpoints side by side on held-out prompts (toy size)."""

import json
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from stepsaver.bench.models import presence_by_size
from stepsaver.cli import app

runner = CliRunner()


def test_presence_by_size_counts_found_objects_per_size():
    obj = lambda name, size: SimpleNamespace(name=name, size=size)  # noqa: E731
    scenes = [SimpleNamespace(objects=(obj("cat", "large"), obj("car", "small"))),
              SimpleNamespace(objects=(obj("dog", "small"),))]
    predicted = [{"objects": {"cat": "left", "dog": "right"}}, {"objects": {"dog": "center"}}]
    assert presence_by_size(predicted, scenes) == {"large": 1.0, "small": 0.5}


def test_bench_models_reports_each_checkpoint(tmp_path):
    from stepsaver.pipelines import EMBEDDED_DIR

    r = runner.invoke(app, ["bench", "models", "-p", f"a={EMBEDDED_DIR}", "-p", f"b={EMBEDDED_DIR}",
                            "-p", f"c={EMBEDDED_DIR}", "--n", "4",
                            "--steps", "2", "--n-boot", "2", "--out-dir", str(tmp_path), "--name", "toy", "--json",
                            "--guidance-for", "c=3"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    rows = result["rows"]
    assert [(x["model"], x["steps"]) for x in rows] == [("a", 2), ("b", 2), ("c", 2)]
    # three checkpoints: each is compared with the one before it, and the last with the first
    assert [(c["a"], c["b"]) for c in result["bootstrap_chain"]] == [("b", "a"), ("c", "b")]
    assert result["bootstrap"]["fid_diff"] == pytest.approx(rows[2]["fid"] - rows[0]["fid"])  # last vs first
    assert result["bootstrap_chain"][0]["fid_diff"] == 0.0  # b vs a: the same folder, the same images
    for key in ("fid", "adherence", "background", "presence_large", "presence_small", "position"):
        assert rows[0][key] == rows[1][key]  # the same folder twice: same noise, same images, same scores
    assert [x["guidance"] for x in rows] == [5.0, 5.0, 3.0] and rows[2]["fid"] != rows[0]["fid"]
    for f in ("toy.json", "toy.md", "toy.png", "toy-grid.png"):
        assert (tmp_path / f).stat().st_size > 0
    bad = runner.invoke(app, ["bench", "models", "-p", "only-a-folder", "-p", "x=y"])
    assert bad.exit_code == 2 and "LABEL=FOLDER" in bad.output
    for item in ("z=3", "a=lots", "a=nan"):
        bad = runner.invoke(app, ["bench", "models", "-p", f"a={EMBEDDED_DIR}", "-p", f"b={EMBEDDED_DIR}",
                                  "--guidance-for", item, "--n", "2"])
        assert bad.exit_code == 2 and "--guidance-for" in bad.output, bad.output
    bad = runner.invoke(app, ["bench", "models", "-p", f"a={EMBEDDED_DIR}", "-p", f"b={EMBEDDED_DIR}",
                              "--split", "test"])
    assert bad.exit_code == 2 and "--split must be eval or train" in bad.output
    one = runner.invoke(app, ["bench", "models", "-p", f"a={EMBEDDED_DIR}"])
    assert one.exit_code == 2 and "at least two" in one.output
