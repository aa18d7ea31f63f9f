"""A toy ``bench optimize`` run (issue 21 part 1) on a tiny random SD-1.5 pipeline: report files, row
structure, the keep rule, the end-to-end and cost rows, failures that are reported and not fatal, bad
settings, the CLI, and ``load_pipeline`` on an optimised folder.

Latency here is real (and noisy): assertions are about structure and sanity (ratios > 0, the keep
rule holds for every kept row), never about which lever wins. Made-up levers (registered for the
run, as tests/shrink/test_optimize.py does) make the combination, a build failure and a failure at
batch 2 happen on purpose; the real levers are the cheap ones (channels_last, int8).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from stepsaver.bench.optimize import COST_FORMULA, VARIANTS, OptimizeBenchConfig, bench_optimize
from stepsaver.errors import StepsaverError
from stepsaver.shrink import optimize as opt
from tests import helpers

SIZES = (1, 2)


class _BatchOne(opt._Wrapper):
    """Runs like the original at batch 1 (the CFG pair: 2 rows), fails at any larger batch."""

    def forward(self, sample, *args, **kwargs):
        if sample.shape[0] > 2:
            raise RuntimeError("kernel built for batch 2 only")
        return self.inner(sample, *args, **kwargs)


class _Perturbed(opt._Wrapper):
    """Fast (nothing changes) but lossy: a deterministic error on the output."""

    def forward(self, *args, **kwargs):
        return opt._map_tensors(self.inner(*args, **kwargs), lambda t: t + 0.5 * torch.sin(40 * t))


def _identity(parts, ctx):
    return {}


def _wrap(cls):
    def apply(parts, ctx):
        parts.denoiser = cls(parts.denoiser)
        return {}
    return apply


def _raises(parts, ctx):
    raise ValueError("cannot build: unsupported layer")


MADE_UP = (opt.Lever("noop", "changes nothing", "graph", _identity, vae=False),
           opt.Lever("batch_one", "works at batch 1 only", "precision", _wrap(_BatchOne), vae=False),
           opt.Lever("boom", "fails to build", "layout", _raises, vae=False),
           opt.Lever("perturb", "lossy", "layout", _wrap(_Perturbed), vae=False))


@pytest.fixture(scope="module")
def made_up_levers():
    with pytest.MonkeyPatch.context() as mp:
        for lever in MADE_UP:
            mp.setitem(opt.LEVERS, lever.name, lever)
        yield


def _toy_config(**overrides) -> OptimizeBenchConfig:
    base = dict(n=1, quality_steps=3, repeats=2, batch_sizes=SIZES, steps=8, e2e_n=1, e2e_repeats=1)
    return OptimizeBenchConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def toy(made_up_levers, tmp_path_factory):
    """One run: two real levers and three made up; min speedup 0.01 so every lossless lever is kept
    (the combination and the chosen path run whatever the timing noise says)."""
    out = tmp_path_factory.mktemp("bench-optimize")
    cfg = _toy_config(levers="channels_last,int8,noop,batch_one,boom", min_speedup=0.01)
    with helpers.one_torch_thread():
        result = bench_optimize(cfg, out_dir=out, pipes={"toy": helpers.build_sd15()}, progress=False)
    return cfg, out, result


def test_toy_run_writes_json_markdown_and_plot(toy):
    cfg, out, result = toy
    for name in ("optimize.json", "optimize.md", "optimize.png"):
        assert (out / name).stat().st_size > 0
    payload = json.loads((out / "optimize.json").read_text())
    assert payload["name"] == "optimize" and payload["rows"] == result["rows"]
    assert payload["optimize_machine"]["torch"] == torch.__version__ and "cpu_flags" in payload["optimize_machine"]
    assert payload["cost_formula"] == COST_FORMULA and payload["config"]["batch_sizes"] == list(SIZES)
    assert payload["optimize"]["toy"]["format"] == opt.FORMAT  # optimize's full record, per model
    md = (out / "optimize.md").read_text()
    assert "## Targets" in md and "![optimize](optimize.png)" in md and "gCO2/kWh" in md
    assert "toy, per iteration:" in md and "toy, end to end at 8 steps with Skip:" in md


def test_each_lever_and_the_combination_get_a_row_with_the_reason(toy):
    cfg, _, result = toy
    rows = {r["lever"]: r for r in result["rows"]}
    assert {"channels_last", "int8", "noop", "batch_one", "boom"} <= set(rows)
    assert rows["boom"]["status"] == "failed" and rows["boom"]["reason"].startswith("ValueError: cannot build")
    assert all(rows["boom"][f"b{b}_speedup"] is None for b in SIZES)
    combination = [r for name, r in rows.items() if "+" in name]
    assert len(combination) == 1 and combination[0]["status"] in ("kept", "dropped")
    assert sum(r["chosen"] for r in rows.values()) == 1  # something lossless was kept at min speedup 0.01
    for r in rows.values():
        assert r["reason"] and r["status"] in ("kept", "dropped", "failed", "unavailable")
        if r["status"] in ("kept", "dropped"):
            assert r["b1_speedup"] > 0 and r["b1_ms"] > 0 and r["b1_eager_ms"] > 0
        if r["status"] == "kept":  # the keep rule, as configured
            assert r["b1_speedup"] >= cfg.min_speedup
            assert r["psnr_min"] >= opt.PSNR_MIN and r["lpips_max"] <= opt.LPIPS_MAX
    assert rows["noop"]["b2_speedup"] > 0 and rows["noop"]["psnr_min"] == opt.PSNR_CAP


def test_a_lever_failing_at_another_batch_size_is_reported_not_fatal(toy):
    """optimize times every lever at every batch size served: one that breaks at batch 2 cannot serve it."""
    _, _, result = toy
    rows = {r["lever"]: r for r in result["rows"]}
    one = rows["batch_one"]
    assert one["status"] == "failed" and one["reason"] == "RuntimeError: kernel built for batch 2 only"
    assert all(one[f"b{b}_speedup"] is None for b in SIZES) and not one["chosen"]
    assert all("batch_one" not in r["lever"] for r in rows.values() if r["status"] == "kept")


def test_kept_levers_are_judged_by_their_worst_batch_size(toy):
    _, _, result = toy
    for r in result["rows"]:
        if r["status"] in ("kept", "dropped"):
            speeds = [r[f"b{b}_speedup"] for b in SIZES]
            assert all(v is not None and v > 0 for v in speeds)
        if r["status"] == "kept":  # the ratio that decided is the worst batch size's
            assert r["reason"].startswith(f"{min(speeds):.2f}x faster per iteration (worst of batch 1 ")


def test_end_to_end_rows_ratios_and_cost(toy):
    cfg, _, result = toy
    ends = {r["variant"]: r for r in result["end_to_end"]}
    assert list(ends) == list(VARIANTS)
    assert ends["eager"]["speedup"] == 1.0 and ends["eager"]["psnr_db"] is None
    for r in ends.values():
        assert r["median_s"] > 0 and r["speedup"] > 0 and r["denoiser_calls"] >= 1
        hours = r["median_s"] * 10_000 / 3600
        assert r["usd_per_10k"] == pytest.approx(hours * cfg.price_per_hour)
        assert r["g_co2_per_10k"] == pytest.approx(hours * cfg.power_watts / 1000 * cfg.grid_g_co2_per_kwh)
    assert ends["eager + Skip"]["denoiser_calls"] <= ends["eager"]["denoiser_calls"] == cfg.steps * 1
    assert ends["chosen"]["levers"] and ends["chosen"]["psnr_db"] >= 35  # the chosen levers are lossless here
    targets = result["targets"]["toy"]
    for key in ("per_iteration", "end_to_end"):
        held = targets[key]["held"]
        assert isinstance(held, bool) and ("NOT held" not in targets[key]["text"]) == held
    assert targets["end_to_end"]["speedup"] == ends["chosen + Skip"]["speedup"]


@pytest.mark.parametrize("field,value,message", [
    ("n", 0, "n (calibration prompts) must be an integer >= 1"),
    ("steps", 0, "steps must be an integer in 1..1000"),
    ("quality_steps", 0, "quality_steps must be an integer in 1..1000"),
    ("e2e_repeats", 0, "--e2e-repeats 3"),
    ("batch_sizes", (1, 0), "batch sizes must be integers >= 1"),
    ("batch_sizes", (), "batch sizes must be integers >= 1"),
    ("price_per_hour", math.nan, "price_per_hour must be a finite number >= 0"),
    ("power_watts", math.inf, "power_watts must be a finite number >= 0"),
    ("grid_g_co2_per_kwh", -1.0, "--intensity 400"),
    ("target_end_to_end", 0.0, "target_end_to_end must be a finite number > 0"),
    ("levers", "channels_last,warp", "unknown lever 'warp'"),
    ("models", (), "at least one model"),
])
def test_bad_settings_are_one_line_errors_before_any_work(field, value, message):
    with pytest.raises(StepsaverError) as info:
        bench_optimize(_toy_config(**{field: value}), out_dir="/nonexistent/never-written", progress=False)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_bench_optimize_on_a_pipeline_folder(made_up_levers, tmp_path):
    """Through typer: a saved tiny pipeline, one lossy lever (dropped), so the chosen setting is eager."""
    from stepsaver.cli import app

    model = helpers.tiny_sd15(tmp_path)
    out = tmp_path / "results"
    args = ["bench", "optimize", "-m", str(model), "--levers", "perturb", "--n", "1", "--quality-steps", "2",
            "--repeats", "2", "--batch", "1,2", "--steps", "6", "--e2e-n", "1", "--e2e-repeats", "1",
            "--price", "0.2", "--out", str(out), "--json"]
    with helpers.one_torch_thread():
        res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["rows"][0]["lever"] == "perturb" and payload["rows"][0]["status"] == "dropped"
    assert "quality lost" in payload["rows"][0]["reason"]  # (and "not faster" too, when timing noise says so)
    ends = {r["variant"]: r for r in payload["end_to_end"]}
    assert ends["chosen"]["note"].startswith("no lever kept")
    assert ends["chosen"]["median_s"] == ends["eager"]["median_s"]
    assert ends["eager"]["usd_per_10k"] == pytest.approx(ends["eager"]["median_s"] * 10_000 / 3600 * 0.2)
    text = payload["targets"][str(model)]["per_iteration"]["text"]
    assert "NOT held" in text and "eager fp32" in text
    assert (out / "optimize.md").is_file() and (out / "optimize.png").is_file()


@pytest.mark.parametrize("args,message", [
    (["--batch", "1,x"], "--batch must be comma-separated integers"),
    (["--price", "nan"], "price_per_hour must be a finite number"),
    (["--steps", "0"], "steps must be an integer in 1..1000"),
])
def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    from stepsaver.cli import app

    res = CliRunner().invoke(app, ["bench", "optimize", "--out", str(tmp_path), *args])
    assert res.exit_code == 2 and message in res.output


def test_load_pipeline_on_an_optimised_folder_names_its_loader(tmp_path):
    from stepsaver.pipelines import load_pipeline

    folder = tmp_path / "tiny-opt"
    folder.mkdir()
    (folder / "optimize.json").write_text(json.dumps({"format": opt.FORMAT, "chosen": []}))
    with pytest.raises(StepsaverError, match="load_optimized") as info:
        load_pipeline(folder, device="cpu")
    assert "optimised model folder" in str(info.value) and "\n" not in str(info.value)
