"""A toy ``bench calibrate`` run: the report files, its verdict lines and the saved configs."""

import json

from stepsaver.calibrate import SearchSpace, load_calibrated
from tests.helpers import build_sd15


def test_toy_bench_calibrate_writes_the_report_and_configs(tmp_path, monkeypatch):
    from stepsaver import pipelines
    from stepsaver.bench.calibrate import bench_calibrate

    def tiny_random(name, scheduler=None, device="auto"):
        pipe = build_sd15()
        pipe.set_progress_bar_config(disable=True)
        return pipe

    monkeypatch.setattr(pipelines, "load_pipeline", tiny_random)
    space = SearchSpace(steps=(3, 6, 10), skip_thresholds=(0.3,), skip_max=(4,), skip_min_steps=6, confidences=(),
                        caches=())
    out = bench_calibrate(["toy"], ["lpips<=0.2", "lpips<=0.3"], n=8, work=tmp_path / "work", out_dir=tmp_path,
                          show_progress=False, space=space, reference_steps=10, height=32, width=32)
    md = (tmp_path / "calibrate.md").read_text()
    assert "toy: lpips<=0.2" in md and "toy: lpips<=0.3" in md and (tmp_path / "calibrate.png").stat().st_size
    assert any("CPU minutes" in v and "target" in v for v in out["verdicts"])  # the first run is timed
    assert any("reusing the renders" in v for v in out["verdicts"])  # the second shares its cache
    payload = json.loads((tmp_path / "calibrate.json").read_text())
    assert set(payload["runs"]) == {"toy: lpips<=0.2", "toy: lpips<=0.3"}
    cfg = load_calibrated(tmp_path / "calibrate-toy-lpips0.2.config.json")
    assert cfg.tolerance == "lpips<=0.2" and cfg.model == "toy"


def test_bench_calibrate_reports_predictability_of_the_labels_given(tmp_path, monkeypatch):
    from stepsaver import pipelines
    from stepsaver.bench.calibrate import bench_calibrate

    monkeypatch.setattr(pipelines, "load_pipeline", lambda *a, **k: build_sd15())
    space = SearchSpace(steps=(3, 6), skip_thresholds=(), skip_max=(), confidences=(), caches=())
    # two prompts, two seeds each: the first agrees with itself, the second does not
    labels = [{"prompt": p, "seed": s, "label": lab}
              for p, s, lab in (("a", 0, 20), ("a", 1, 20), ("b", 0, 30), ("b", 1, 60))]
    bench_calibrate(["toy"], ["lpips<=0.3"], n=8, work=tmp_path / "work", out_dir=tmp_path, show_progress=False,
                    space=space, reference_steps=6, labels={"toy": labels}, height=32, width=32)
    md = (tmp_path / "calibrate.md").read_text()
    assert "Predict on this model" in md and "ICC" in md.upper()


def test_bench_calibrate_refuses_labels_of_a_model_it_does_not_run(tmp_path):
    import pytest

    from stepsaver.bench.calibrate import bench_calibrate
    from stepsaver.errors import StepsaverError

    with pytest.raises(StepsaverError, match="labels were given for tiny-flux"):
        bench_calibrate(["tiny"], ["lpips<=0.3"], labels={"tiny-flux": []}, out_dir=tmp_path, work=tmp_path / "w")


def test_cli_bench_calibrate_labels_needs_model_equals_path():
    from typer.testing import CliRunner

    from stepsaver.cli import app

    out = CliRunner().invoke(app, ["bench", "calibrate", "--labels", "data/labels/tiny-train"])
    assert out.exit_code != 0 and "MODEL=PATH" in out.output and "Traceback" not in out.output
