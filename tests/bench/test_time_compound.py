"""bench time (the CLI writes report and plot) and bench compound (every method, paired CIs)."""

import json
from pathlib import Path


def test_bench_time_cli_writes_report_and_plot(tmp_path):
    from typer.testing import CliRunner

    from stepsaver.cli import app

    r = CliRunner().invoke(app, ["bench", "time", "--steps", "2:6:2", "--repeats", "1", "--out-dir",
                                 str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert payload["ms_per_step"] > 0 and (tmp_path / "time-vs-steps.png").exists()
    rows = json.loads((tmp_path / "time-vs-steps.json").read_text())["rows"]
    assert [row["steps"] for row in rows] == [2, 4, 6]
    assert CliRunner().invoke(app, ["bench", "time", "--steps", "x"]).exit_code == 2


def test_bench_compound_runs_every_method_on_the_same_prompts_with_paired_cis(tmp_path):
    from stepsaver.bench.compound import bench_compound

    res = bench_compound(3, out_dir=tmp_path, progress=False, n_boot=20)
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows)[:4] == ["fixed 50", "Predict alone", "Skip alone (50 steps)", "Predict + Skip"]
    assert rows["fixed 50"]["denoiser_calls"] == 50 and rows["fixed 50"]["psnr_vs_fixed50"] == 100
    assert rows["Skip alone (50 steps)"]["denoiser_calls"] < 50  # the hook skipped calls
    iso = next(m for m in rows if m.startswith("iso-cost fixed"))
    assert abs(rows[iso]["denoiser_calls"] - rows["Predict + Skip"]["denoiser_calls"]) <= 0.5
    report = json.loads(Path(res["json"]).read_text())
    ci = report["bootstrap_vs_iso"]
    assert ci["paired"] is True and report["bootstrap_vs_fixed50"]["paired"] is True
    assert report["targets"]["beats_iso"] == (ci["ci_high"] < 0)  # better = the whole CI below 0
