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
