"""Hostile or careless input to the CLI: one line on stderr and exit 2, found before any model work."""

import json

import pytest
from typer.testing import CliRunner

from stepsaver.cli import app
from stepsaver.cli.render import emit
from stepsaver.files import exclusive_folder

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, list(map(str, args)))


@pytest.mark.parametrize("args, match", [
    (["--guidance", "nan"], "guidance must be a finite number"),
    (["--guidance", "inf"], "guidance must be a finite number"),
    (["--seed", 10**23], "seed must be an integer in 0.."),
    (["--seed", -1], "seed must be an integer in 0.."),
    (["--threshold", "nan", "--skip"], "skip threshold must be a finite number"),
    (["--guidance-rescale", "nan"], "guidance rescale"),
])
def test_non_finite_numbers_and_seeds_out_of_range(tmp_path, args, match, monkeypatch):
    import stepsaver.pipelines

    monkeypatch.setattr(stepsaver.pipelines, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    r = _run("generate", "a cat, blue background", "--steps", 2, "--out", tmp_path / "x.png", *args)
    assert r.exit_code == 2 and match in r.output and "Traceback" not in r.output, r.output


def test_unwritable_outputs_are_refused_before_generating(tmp_path, monkeypatch):
    import stepsaver.pipelines

    monkeypatch.setattr(stepsaver.pipelines, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    (tmp_path / "dir.png").mkdir()
    for out, match in ((a_file / "x.png", "cannot write"), ("/proc/x.png", "cannot write"),
                       (tmp_path / "dir.png", "is a directory"), (tmp_path / "x.jpg", "must be a .png")):
        r = _run("generate", "a cat, blue background", "--steps", 2, "--out", out)
        assert r.exit_code == 2 and match in r.output and "Traceback" not in r.output, (out, r.output)
    assert not list(tmp_path.glob(".*probe"))  # the writability probe leaves nothing behind


def test_a_lone_surrogate_prompt_is_a_clear_error(tmp_path):
    r = _run("generate", "a \ud800 cat", "--steps", 2, "--out", tmp_path / "x.png")
    assert r.exit_code == 2 and "lone surrogate" in r.output


def test_json_output_is_strict_json(capsys):
    emit({"fid": float("nan"), "speedup": float("inf"), "ok": 1.5}, as_json=True, title="t")
    text = capsys.readouterr().out
    assert "NaN" not in text and "Infinity" not in text and json.loads(text) == {"fid": None, "speedup": None,
                                                                                 "ok": 1.5}


def _label(tmp_path, out):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat, blue background\n")
    return _run("label", "--prompts", prompts, "--out", out, "--steps", "2,3", "--json")


def test_label_with_a_corrupt_meta_file_is_a_clear_error(tmp_path):
    out = tmp_path / "labels"
    out.mkdir()
    for broken in ("", '{"model": "tiny", "ste'):
        (out / "meta.json").write_text(broken)
        r = _label(tmp_path, out)
        assert r.exit_code == 2 and "meta.json is empty or corrupt" in r.output and "Traceback" not in r.output


def test_two_label_runs_on_one_folder_cannot_both_write(tmp_path):
    out = tmp_path / "labels"
    with exclusive_folder(out, "labelling run"):  # another run holds the folder
        r = _label(tmp_path, out)
    assert r.exit_code == 2 and "in use by another labelling run" in r.output and "pid" in r.output
    assert not (out / "labels.jsonl").exists()
