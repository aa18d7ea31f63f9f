"""The `stepsaver` CLI: --json on every scheduler and model layout, and one-line errors with exit 2."""

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from stepsaver.cli import app
from stepsaver.pipelines import SCHEDULERS, make_scheduler

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, list(map(str, args)))


@pytest.mark.parametrize("scheduler", [k for k, v in SCHEDULERS.items() if not v.flow])
def test_generate_json_on_embedded_model_with_every_scheduler(tmp_path, scheduler, embedded_pipe):
    out = tmp_path / f"{scheduler}.png"
    r = _run("generate", "a small cat on the left, yellow background", "--steps", 3, "--scheduler",
             scheduler, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert payload["steps"] == 3 and payload["scheduler"] == scheduler
    # one call per scheduler timestep: Heun/DPM2 repeat timesteps (2n-1), PLMS adds a warm-up call
    sched = make_scheduler(scheduler, embedded_pipe.scheduler.config)
    sched.set_timesteps(3)
    assert payload["denoiser_calls"] == len(sched.timesteps)
    if SCHEDULERS[scheduler].second_order:
        assert payload["denoiser_calls"] == 2 * 3 - 1
    assert payload["seconds"] > 0
    assert Image.open(out).size == (64, 64)


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m", "heun"])
def test_generate_json_on_tiny_sd_and_sdxl_folders(tmp_path, tiny_folders, layout, scheduler):
    out = tmp_path / "x.png"
    r = _run("generate", "a red cat", "--model", tiny_folders[layout], "--steps", 2, "--scheduler", scheduler,
             "--out", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["path"] == str(out)
    assert Image.open(out).size == (32, 32)


@pytest.mark.parametrize(
    "args,message",
    [
        (["", "--steps", "3"], "prompt is empty"),
        (["cat", "--steps", "0"], "steps must be"),
        (["cat", "--steps", "1001"], "steps must be"),
        (["cat", "--scheduler", "bogus"], "unknown scheduler 'bogus'; choose one of: ddim"),
        (["cat", "--model", "/no/such/folder"], "does not exist"),
        (["cat", "--guidance", "-1"], "guidance must be a finite number >= 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message):
    r = _run("generate", *args)
    assert r.exit_code == 2
    lines = [line for line in r.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.output


def test_json_errors_are_json(tmp_path):
    r = _run("generate", "cat", "--steps", "0", "--json")
    assert r.exit_code == 2
    assert "steps must be" in json.loads(r.stdout)["error"]


def test_schedulers_and_scenes_commands(tmp_path):
    r = _run("schedulers", "--json")
    assert r.exit_code == 0
    assert set(json.loads(r.stdout)["schedulers"]) == set(SCHEDULERS)
    r = _run("scenes", tmp_path / "s", "--n", 20, "--split", "eval", "--json")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert payload["scenes"] == 20 and (tmp_path / "s" / "grid.png").exists()


def test_generate_with_skip_reports_calls_made_and_saved(tmp_path):
    r = _run("generate", "a big apple in the center on a blue background", "--steps", 20, "--skip",
             "--threshold", 0.5, "--max-skips", 2, "--out", tmp_path / "s.png", "--json")
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert p["denoiser_calls"] + p["denoiser_calls_saved"] == 20
    assert p["denoiser_calls_saved"] > 0 and len(p["skipped_steps"]) == p["denoiser_calls_saved"]
    r = _run("generate", "cat", "--skip", "--max-skips", -1)
    assert r.exit_code == 2 and "max_skips" in r.stderr
    # the other rules: drift (a huge threshold reuses whenever C_max allows) and a one-line error for a typo
    r = _run("generate", "a big apple in the center on a blue background", "--steps", 12, "--skip",
             "--skip-rule", "drift", "--threshold", 100, "--max-skips", 1, "--out", tmp_path / "d.png", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["skipped_steps"] == [4, 6, 8, 10]  # after the 4 warm-up steps, C_max 1
    r = _run("generate", "cat", "--skip", "--skip-rule", "sometimes")
    assert r.exit_code == 2 and "rule must be one of criterion, fixed, drift" in r.stderr
