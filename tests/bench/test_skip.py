"""``stepsaver bench skip``: a tiny end-to-end run writes every row, column, ablation and target line."""

import json

import pytest
import torch

from stepsaver import StepsaverError
from stepsaver.bench.skip import COLUMNS, SkipBenchConfig, bench_skip, peak_memory_bytes, targets


def test_peak_memory_counts_what_the_call_allocates():
    def allocate():
        x = torch.ones(1024, 1024)  # 4 MiB
        return float((x * 2).sum())  # another 4 MiB alive at the same time

    peak = peak_memory_bytes(allocate)
    assert 8 * 2**20 <= peak < 16 * 2**20


def test_bench_skip_smoke(tmp_path, monkeypatch):
    """Every stage on 2 prompts x 6 steps. FID's 2048x2048 eigen-decompositions (seconds each) and the
    profiler pass are stubbed here; their own code is tested in test_fid_quality and above."""
    import stepsaver.bench.skip as bench_module
    import stepsaver.measure.fid as fid_module

    monkeypatch.setattr(fid_module, "features", lambda images, **_: torch.zeros(len(images), 4))
    monkeypatch.setattr(fid_module, "fid_from_features", lambda real, fake: 1.5)
    monkeypatch.setattr(bench_module, "peak_memory_bytes", lambda fn, device="cpu": (fn(), 2**20)[1])
    compiled: dict = {}  # dynamo's real tracing with its eager backend: Inductor's code generation takes minutes
    monkeypatch.setattr(bench_module, "_compiled_denoiser", lambda pipe: compiled.setdefault(
        "unet", torch.compile(pipe.unet, backend="eager")))
    cfg = SkipBenchConfig(n=2, ablation_n=1, oracle_n=1, time_n=1, macs_n=1, schedulers=("ddim",), steps=6,
                          ablation_steps=(6, 5), deltas=(0.01, 0.05), max_skips_grid=(2, 4), batch=2,
                          device="cpu", threads=1, sweep_n=2, sweep_schedulers=("ddim", "heun"), sweep_steps=(6,))
    threads = torch.get_num_threads()
    result = bench_skip(cfg, out_dir=tmp_path, show_progress=False)
    assert torch.get_num_threads() == threads  # restored
    payload = json.loads((tmp_path / "skip.json").read_text())
    keys = [r["key"] for r in payload["rows"]]
    assert keys == ["full", "ours", "ours_batch", "criterion", "paper", "compat", "full_compiled", "ours_compiled",
                    "deepcache_2", "deepcache_3", "deepcache_5", "fixed_2", "fixed_3", "fixed_5", "drift_0.06",
                    "drift_0.15", "iso"]
    assert payload["config"]["threshold"] == 0.1 and payload["config"]["max_skips"] == 6  # ours = Skip's default
    assert "drift rule" in payload["rows"][1]["method"] and "previous default" in payload["rows"][3]["method"]
    for row in payload["rows"]:
        assert set(COLUMNS) <= set(row)
        assert row["denoiser_calls"] <= 6 and row["gmacs_per_image"] > 0 and row["median_latency_ms"] > 0
    full = payload["rows"][0]
    assert full["speedup"] == 1.0 and full["psnr_db"] is None and full["fid"] == 0.0
    assert all(r["fid"] == 1.5 and r["peak_memory_mb"] == 1.0 for r in payload["rows"][1:])
    dc5 = payload["rows"][keys.index("deepcache_5")]
    by_key = dict(zip(keys, payload["rows"], strict=True))
    assert by_key["full_compiled"]["psnr_db"] > 60  # the compiled UNet renders the eager image (to float error)
    assert by_key["ours_compiled"]["denoiser_calls"] == by_key["ours"]["denoiser_calls"]
    # fixed interval: 4 warm-up calls, then one every k steps (6 steps: k=2 -> step 5 runs; k>=3 -> none)
    assert [by_key[f"fixed_{k}"]["denoiser_calls"] for k in (2, 3, 5)] == [5, 4, 4]
    sweep = payload["scheduler_sweep"]
    # per scheduler: ours (the shipped drift rule), its iso-cost, the criterion, its iso-cost, the paper's rule
    assert [r["method"][:3] for r in sweep] == ["our", "iso", "cri", "iso", "pap"] * 2
    assert [r.get("iso_of") for r in sweep[:5]] == [None, "ours", None, "criterion", None]
    assert [r["scheduler"] for r in sweep] == ["ddim"] * 5 + ["heun"] * 5
    assert sweep[5]["full_calls"] == 11  # heun is second-order: 2N - 1 calls in N steps
    assert dc5["gmacs_per_image"] < full["gmacs_per_image"]  # DeepCache's saving shows in MACs
    assert len(payload["ablation_grid"]) == 4 and len(payload["ablation_steps"]) == 2
    assert {"beats_iso", "iso_steps", "iso_psnr_db"} <= set(payload["ablation_grid"][0])
    assert len(payload["oracle"]["prompts"]) == 1 and "p_value" in payload["oracle"]["chi2"]
    assert set(payload["targets"]) == {"calls_speed_quality", "beats_deepcache_ddim", "beats_fixed_ddim",
                                       "beats_iso_ddim", "scheduler_sweep", "scheduler_sweep_criterion"}
    md = (tmp_path / "skip.md").read_text()
    assert "**Target 1 (DDIM, 6 steps" in md and "**Target 2 (ddim" in md and "**Target 3 (ddim" in md
    assert "**Target 4 (ddim" in md
    assert "## Ablation: threshold x C_max of ours" in md and "## Oracle vs estimator" in md
    assert "## Every scheduler" in md and "**Scheduler sweep" in md and "**Scheduler sweep, criterion rule" in md
    for name in ("skip-psnr-vs-speedup.png", "skip-ablation.png", "skip-paths.png", "skip-schedulers.png"):
        assert (tmp_path / name).stat().st_size > 0 and name in md
    assert result["md"] == str(tmp_path / "skip.md")


def test_bench_skip_on_the_flux_layout_model(tmp_path, monkeypatch):
    """tiny-flux: the transformer is compiled, DeepCache (a UNet cache) is left out with a note, and the
    sweep defaults to the schedulers that fit a flow-matching model."""
    import stepsaver.bench.skip as bench_module

    monkeypatch.setattr(bench_module, "peak_memory_bytes", lambda fn, device="cpu": (fn(), 2**20)[1])
    compiled: dict = {}
    monkeypatch.setattr(bench_module, "_compiled_denoiser", lambda pipe: compiled.setdefault(
        "transformer", torch.compile(pipe.transformer, backend="eager")))
    cfg = SkipBenchConfig(model="tiny-flux", n=2, ablation_n=1, oracle_n=0, time_n=1, macs_n=1,
                          schedulers=("flow_euler",), steps=8, ablation_steps=(8,), deltas=(0.1,),
                          max_skips_grid=(6,), batch=2, device="cpu", threads=1, sweep_n=2, sweep_steps=(8,),
                          fid=False)
    bench_skip(cfg, out_dir=tmp_path, show_progress=False)
    payload = json.loads((tmp_path / "skip.json").read_text())
    keys = [r["key"] for r in payload["rows"]]
    assert not [k for k in keys if k.startswith("deepcache")]
    assert {"ours", "full_compiled", "ours_compiled"} <= set(keys)
    by_key = dict(zip(keys, payload["rows"], strict=True))
    assert by_key["full_compiled"]["psnr_db"] > 60  # the compiled transformer renders the eager image
    assert by_key["ours"]["denoiser_calls"] < by_key["full"]["denoiser_calls"] == 16  # true CFG: 2 calls a step
    # plain steps at ours' calls: half as many steps as calls, since every step makes two
    assert by_key["iso"]["denoiser_calls"] == 2 * by_key["iso"]["steps"]
    assert abs(by_key["iso"]["denoiser_calls"] - by_key["ours"]["denoiser_calls"]) <= 2
    for r in payload["scheduler_sweep"]:
        if r["method"].startswith("iso"):
            twin = next(o for o in payload["scheduler_sweep"]
                        if o["method"] == r["iso_of"] and o["steps"] == r["steps"])
            assert abs(r["denoiser_calls"] - twin["denoiser_calls"]) <= 2
    assert {r["scheduler"] for r in payload["scheduler_sweep"]} == {"flow_euler"}
    assert "beats_deepcache_flow_euler" not in payload["targets"] and "beats_fixed_flow_euler" in payload["targets"]
    md = (tmp_path / "skip.md").read_text()
    assert "DeepCache rows are left out" in md and "**Target 2" not in md
    # a scheduler that does not fit the model is one line naming the ones that do
    with pytest.raises(StepsaverError, match=r"ddim do not fit 'tiny-flux' \(a flow-matching model\).*flow_euler"):
        bench_skip(SkipBenchConfig(model="tiny-flux", n=2, ablation_n=0, oracle_n=0, time_n=1, macs_n=1,
                                   schedulers=("ddim",), sweep_n=0, device="cpu", fid=False),
                   out_dir=tmp_path / "x", show_progress=False)


def _row(key, speedup, psnr, lpips, calls=25.0, steps=50, scheduler="ddim"):
    return {"scheduler": scheduler, "key": key, "method": key, "speedup": speedup, "psnr_db": psnr, "lpips": lpips,
            "denoiser_calls": calls, "steps": steps}


def test_targets_are_decided_from_the_numbers():
    rows = [_row("full", 1.0, None, 0.0, calls=50), _row("ours", 1.9, 27.0, 0.05),
            _row("deepcache_2", 1.5, 25.0, 0.08), _row("deepcache_5", 2.5, 20.0, 0.2),
            _row("iso", 2.0, 28.0, 0.04, steps=25)]
    grid = [{"scheduler": "ddim", "threshold": 0.005, "max_skips": 2, "psnr_db": 30.0, "iso_psnr_db": 29.0,
             "iso_steps": 40, "beats_iso": True}]
    out = targets(rows, grid, 50)
    assert out["calls_speed_quality"]["holds"] is True and "holds**" in out["calls_speed_quality"]["text"]
    assert out["beats_deepcache_ddim"]["holds"] is True and out["beats_deepcache_ddim"]["compared"] == ["deepcache_2"]
    assert out["beats_iso_ddim"]["holds"] is False and "does not beat" in out["beats_iso_ddim"]["text"]
    assert out["beats_iso_ddim"]["settings_that_beat_iso"] == [(0.005, 2)]
    assert "beats_fixed_ddim" not in out  # no fixed-interval rows: no target 4
    fixed = [_row("fixed_2", 1.8, 26.0, 0.06, calls=27.0), _row("fixed_3", 2.4, 24.0, 0.09, calls=18.0)]
    out = targets(rows + fixed, grid, 50)["beats_fixed_ddim"]
    assert out["holds"] is True and out["compared"] == ["fixed_3"]  # fixed_2 makes more calls than ours (25)
    fixed[1] = _row("fixed_3", 2.4, 28.0, 0.09, calls=18.0)  # cheaper and sharper: ours loses
    assert targets(rows + fixed, grid, 50)["beats_fixed_ddim"]["holds"] is False
    rows[1] = _row("ours", 1.7, 27.0, 0.05)  # too slow for the wall-clock target
    assert targets(rows, grid, 50)["calls_speed_quality"]["holds"] is False
    rows[1] = _row("ours", 1.2, 27.0, 0.05)  # slower than every DeepCache interval
    assert targets(rows, grid, 50)["beats_deepcache_ddim"]["holds"] is None


@pytest.mark.parametrize("kwargs,match", [
    ({"n": 1}, "--n must be >= 2"),
    ({"n": 4, "ablation_n": 5}, "--ablation-n must be in 0..4"),
    ({"schedulers": ("heun",)}, "twice a step"),
    ({"schedulers": ("nope",)}, "unknown scheduler"),
    ({"steps": 3}, "step counts must be in 5.."),
    ({"threads": 0}, "--threads must be >= 1"),
    ({"sweep_n": 5}, "--sweep-n must be in 0..4"),
    ({"sweep_schedulers": ("nope",)}, "unknown scheduler"),
])
def test_bad_settings_are_one_line_errors(kwargs, match):
    with pytest.raises(StepsaverError, match=match) as info:
        SkipBenchConfig(**{"n": 4, "ablation_n": 2, "oracle_n": 1, "time_n": 2, "sweep_n": 2, **kwargs}).validate()
    assert "\n" not in str(info.value)


def test_render_cache_on_disk_resumes_and_rejects_stale_files(tmp_path, monkeypatch):
    """A second run over the same --cache folder renders nothing already there; a file whose prompt
    differs (changed vocabulary) or that is torn is rendered again, never reused."""
    import numpy as np

    import stepsaver.bench.skip as bench_module
    from stepsaver.bench.skip import Method, _Bar, _Bench

    calls = []
    real = bench_module._render
    monkeypatch.setattr(bench_module, "_render", lambda pipe, method, prompts, *a: (calls.append(len(prompts)),
                                                                                    real(pipe, method, prompts, *a))[1])
    cfg = SkipBenchConfig(n=3, schedulers=("ddim",), steps=6, device="cpu", cache_dir=str(tmp_path))
    method = Method("skip", 6, 0.05, 2)
    first = _Bench(cfg, _Bar(False))
    first.use("ddim")
    a = first.renders(method, 3, "x")
    assert sum(calls) == 3
    folder = next(tmp_path.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == ["00000.npz", "00001.npz", "00002.npz"]

    calls.clear()
    second = _Bench(cfg, _Bar(False))
    second.use("ddim")
    b = second.renders(method, 3, "x")
    assert calls == []
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.image, y.image) and x.calls == y.calls and x.path == y.path

    (folder / "00001.npz").write_bytes(b"torn")
    with np.load(folder / "00002.npz") as z:
        np.savez(folder / "00002.npz", **{**dict(z), "prompt": "some other caption"})
    third = _Bench(cfg, _Bar(False))
    third.use("ddim")
    c = third.renders(method, 3, "x")
    assert sum(calls) == 2
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, c, strict=True))
    assert len(list(tmp_path.iterdir())) == 1  # same weights and settings: same folder


def test_ablations_default_to_the_first_scheduler_and_reject_unknown_ones():
    cfg = SkipBenchConfig(schedulers=("ddim", "euler"))
    assert cfg.ablated() == ("ddim",)
    assert SkipBenchConfig(schedulers=("ddim", "euler"), ablation_schedulers=("ddim", "euler")).ablated() == \
        ("ddim", "euler")
    with pytest.raises(StepsaverError, match="ablation-schedulers"):
        SkipBenchConfig(schedulers=("ddim",), ablation_schedulers=("euler",)).validate()
