"""The UNet architecture search: layouts, latency, a toy resumable search, its report, and the CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stepsaver.cli import app
from stepsaver.errors import StepsaverError
from stepsaver.shrink.architecture import unet_config
from stepsaver.shrink.search import (
    BASELINE,
    CANDIDATES,
    Layout,
    budget_check,
    candidates,
    default_base,
    measure_latency,
    paired_mean_ci,
    pareto,
    search,
    train_candidate,
)


def _meta_unet(cfg):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**cfg)


def test_default_candidates_are_distinct_valid_unets_around_the_baseline(embedded_pipe):
    assert 6 <= len(CANDIDATES) <= 10 and CANDIDATES[0] is BASELINE
    assert [c.name for c in candidates()] == [c.name for c in CANDIDATES]
    assert BASELINE.unet_config() == unet_config()  # today's layout, exactly
    counts = {c.name: c.params() for c in CANDIDATES}
    assert counts["baseline"] == sum(p.numel() for p in embedded_pipe.unet.parameters())
    assert len(set(counts.values())) == len(counts)  # every candidate is another network
    for smaller in ("attn-low", "skip-high", "narrow-high", "lean-skip", "lean-narrow", "minimal"):
        assert counts[smaller] < counts["baseline"], smaller
    assert counts["attn-low"] < counts["attn-up"] and counts["minimal"] == min(counts.values())
    by = {c.name: c for c in CANDIDATES}
    up = _meta_unet(by["attn-up"].unet_config())  # nested depths: none at 8x8 down, 2 layers at 4x4 up
    assert [type(b).__name__ for b in up.down_blocks] == ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"]
    assert [len(a.transformer_blocks) for a in up.up_blocks[0].attentions] == [2, 2]
    assert len(up.mid_block.attentions[0].transformer_blocks) == 1
    skip = _meta_unet(by["skip-high"].unet_config())  # no 16x16 down resnet; the up path keeps one per skip
    assert len(skip.down_blocks[0].resnets) == 0 and len(skip.up_blocks[-1].resnets) == 1
    assert type(_meta_unet(by["minimal"].unet_config()).mid_block).__name__ == "UNetMidBlock2D"


def test_layouts_load_into_the_embedded_pipeline(embedded_pipe, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from stepsaver import generate

    for layout in candidates(["attn-up", "two-level", "minimal"]):
        unet = layout.build(seed=0).eval()
        unet.save_pretrained(tmp_path / layout.name)  # tuples become JSON lists: the config must still load
        loaded = UNet2DConditionModel.from_pretrained(tmp_path / layout.name)
        assert sum(p.numel() for p in loaded.parameters()) == layout.params()
        pipe = StableDiffusionPipeline(**{**embedded_pipe.components, "unet": loaded.eval()})
        result = generate(pipe, "a cat on the left, blue background", steps=2, seed=0)
        assert result.denoiser_calls == 2 and np.asarray(result.image).shape == (64, 64, 3), layout.name


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="Bad Name"), "lower-case"),
    (dict(resnets=(1, 1)), "one entry per stage"),
    (dict(resnets=(1, 5, 1)), "integers in 0..4"),
    (dict(up_attention=(0, -1, 1)), "integers in 0..8"),
    (dict(resnets=(0, 1, 1), down_attention=(1, 1, 1)), "has no resnet"),
    (dict(resnets=(1, 0, 1), down_attention=(0, 0, 1)), "changes width 64 -> 128"),
    (dict(channels=(60, 128, 128)), "multiples of 16"),
    (dict(channels=(64,), resnets=(1,), down_attention=(1,), up_attention=(1,)), "2 to 4 stages"),
    (dict(down_attention=(0, 0, 2), up_attention=(0, 0, 2), mid_attention=1), "mid_attention 1 must equal"),
    (dict(down_attention=(0, 0, 0), up_attention=(0, 0, 0), mid_attention=0), "ignore the prompt"),
    (dict(mid_attention=True), "mid_attention must be an integer"),
])
def test_bad_layouts_are_one_line_errors(kwargs, match):
    with pytest.raises(StepsaverError, match=match):
        Layout(**{"name": "x", **kwargs}).unet_config()


def test_unknown_candidate_names_list_the_known_ones():
    with pytest.raises(StepsaverError, match="unknown candidate 'nope'; choose from: baseline, attn-low"):
        candidates(["attn-low", "nope"])
    assert [c.name for c in candidates(["minimal"])] == ["baseline", "minimal"]  # the baseline always leads


def test_latency_is_paired_with_the_baseline():
    row = measure_latency(candidates(["minimal"])[1], repeats=2, warmup=0)
    assert row["latency_ms"] > 0 and row["baseline_ms"] > 0 and row["latency_ratio"] > 0
    assert row["speedup"] == pytest.approx(1 / row["latency_ratio"]) and row["params"] == 4_561_188
    with pytest.raises(StepsaverError, match="repeats >= 1"):
        measure_latency(BASELINE, repeats=0)


def test_budget_pareto_and_paired_ci_on_known_rows():
    rows = [{"candidate": "baseline", "latency_ratio": 1.0, "speedup": 1.0, "fid": 10.0},
            {"candidate": "a", "latency_ratio": 0.8, "speedup": 1.25, "fid": 12.0},
            {"candidate": "b", "latency_ratio": 0.75, "speedup": 1 / 0.75, "fid": 11.0},
            {"candidate": "c", "latency_ratio": 0.9, "speedup": 1 / 0.9, "fid": 13.0}]
    check = budget_check(rows, 0.714)
    assert check["meets"] == [] and check["closest"] == "b" and "closest: b at 0.750 (1.33x)" in check["note"]
    assert budget_check(rows, 0.8)["meets"] == ["a", "b"]
    with pytest.raises(StepsaverError, match="must be > 0"):
        budget_check(rows, 0)
    assert pareto(rows) == ["b", "baseline"]
    ci = paired_mean_ci(np.array([1.0, 0.5, 0.75]), np.array([0.5, 0.5, 0.5]), n_boot=50)
    assert ci["diff"] == pytest.approx(0.25) and ci["ci_low"] <= 0.25 <= ci["ci_high"]


def _base(root):
    return default_base(scenes=16, batch_size=4, cache=str(root / "cache"), checkpoint_every=2, ema_fraction=0.5,
                        grid_prompts=1, grid_steps=1, warmup=1)


TOY = dict(layouts=candidates(["minimal"]), proxy_steps=2, n=4, steps=2, eval_batch=4, latency_repeats=1,
           latency_warmup=0, n_boot=5, budget=2.0, progress=False)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    with pytest.raises(StepsaverError, match=r"baseline stopped at step [01] of 2.*run the same command again"):
        search(_base(root), out_dir=root / "runs", results_dir=root / "res", max_minutes=1e-4, **TOY)
    assert (root / "runs" / "baseline" / "checkpoint.pt").exists()  # stopped (as if killed): it continues below
    result = search(_base(root), out_dir=root / "runs", results_dir=root / "res", ledger_dir=root / "ledger", **TOY)
    return root, result


def test_toy_search_trains_scores_and_reports(toy):
    from stepsaver import load_pipeline

    root, result = toy
    assert [r["candidate"] for r in result["rows"]] == ["baseline", "minimal"]
    assert all(r["fid"] >= 0 and 0 <= r["adherence"] <= 1 and r["latency_ratio"] > 0 for r in result["rows"])
    assert all(t["trained_now"] and t["steps"] == 2 for t in result["training"].values())
    assert result["winner"] == "minimal" and result["bootstrap_fid"]["paired"]
    pipe = load_pipeline(result["training"]["minimal"]["pipeline"], device="cpu")  # a standard diffusers folder
    assert list(pipe.unet.config.block_out_channels) == [32, 128, 128]
    assert pipe.unet.config.mid_block_type == "UNetMidBlock2D"
    for ext in ("md", "json", "png"):
        assert (root / "res" / f"architecture.{ext}").stat().st_size > 0
    report = json.loads((root / "res" / "architecture.json").read_text())
    assert report["machine"]["cores"] and report["verdict"]["candidate"] == "minimal"
    assert set(report["verdict"]) >= {"faster", "fid_no_worse", "adherence_no_worse", "ship"}
    md = (root / "res" / "architecture.md").read_text()
    assert "Verdict" in md and ">= 1.4x faster" in md and "Pareto set" in md and "Machine:" in md


def test_search_resumes_without_retraining_or_rerendering(toy, monkeypatch):
    import stepsaver.bench.heldout
    import stepsaver.shrink.train

    root, first = toy
    monkeypatch.setattr(stepsaver.shrink.train, "train_model", lambda *a, **k: pytest.fail("retrained"))
    monkeypatch.setattr(stepsaver.bench.heldout, "render_set", lambda *a, **k: pytest.fail("re-rendered"))
    again = search(_base(root), out_dir=root / "runs", results_dir=None, **TOY)
    assert not any(t["trained_now"] for t in again["training"].values())
    assert [r["fid"] for r in again["rows"]] == [r["fid"] for r in first["rows"]]
    # a run folder is never mixed with another layout's or another schedule's run
    with pytest.raises(StepsaverError, match=r"another layout \('minimal'\), not 'attn-low'"):
        train_candidate(candidates(["attn-low"])[1], _base(root), root / "runs" / "minimal", 2)
    with pytest.raises(StepsaverError, match=r"other training settings \(steps 2 -> 3\)"):
        train_candidate(candidates(["minimal"])[1], _base(root), root / "runs" / "minimal", 3)


def test_the_ledger_lets_a_search_continue_without_its_run_folders(toy, monkeypatch):
    from dataclasses import replace

    import stepsaver.bench.heldout
    import stepsaver.shrink.train
    from stepsaver.shrink.search import Ledger

    root, first = toy
    entries = sorted(p.name for p in (root / "ledger").iterdir())
    assert len(entries) == 4 and {p.rsplit("-", 1)[0] for p in entries} == {"baseline", "minimal"}
    monkeypatch.setattr(stepsaver.shrink.train, "train_model", lambda *a, **k: pytest.fail("retrained"))
    monkeypatch.setattr(stepsaver.bench.heldout, "render_set", lambda *a, **k: pytest.fail("re-rendered"))
    # another session: the run folders are gone, the committed ledger is not
    again = search(_base(root), out_dir=root / "gone", ledger_dir=root / "ledger", results_dir=None, **TOY)
    assert [r["fid"] for r in again["rows"]] == [r["fid"] for r in first["rows"]]
    assert [r["adherence"] for r in again["rows"]] == [r["adherence"] for r in first["rows"]]
    assert all(t["from_ledger"] for t in again["training"].values()) and not (root / "gone" / "minimal").exists()
    # the key moves with the layout, the schedule and the scoring, never with the run folder
    minimal, base = candidates(["minimal"])[1], replace(_base(root), steps=2)
    scoring = {"n": 4, "steps": 2, "guidance": 5.0, "seed": 0, "scene_seed": 2}
    key = Ledger.key(minimal, base, scoring)
    assert key == Ledger.key(minimal, replace(base, out="elsewhere"), scoring)
    assert len({key, Ledger.key(BASELINE, base, scoring), Ledger.key(minimal, replace(base, steps=3), scoring),
                Ledger.key(minimal, base, {**scoring, "steps": 3})}) == 4
    # a torn entry is not trusted: that candidate is trained and scored again
    (root / "ledger" / f"minimal-{key}.npz").write_bytes(b"torn")
    assert Ledger(root / "ledger").get("minimal", key) is None


def test_a_budget_no_candidate_meets_names_the_closest_before_training(tmp_path):
    with pytest.raises(StepsaverError, match="no candidate meets the latency budget 0.010.*closest: minimal"):
        search(_base(tmp_path), out_dir=tmp_path / "runs", results_dir=tmp_path / "res",
               **{**TOY, "budget": 0.01})
    assert not (tmp_path / "runs").exists() and not (tmp_path / "res").exists()


def test_cli_latency_only_and_bad_input():
    runner = CliRunner()
    r = runner.invoke(app, ["shrink", "search", "--latency-only", "-c", "minimal", "--repeats", "1", "--json"])
    assert r.exit_code == 0, r.output
    payload = json.loads(r.output)
    assert [row["candidate"] for row in payload["rows"]] == ["baseline", "minimal"]
    assert payload["rows"][1]["params"] == 4_561_188 and payload["budget"]["budget"] == pytest.approx(0.714)
    for args, match in ((["-c", "nope"], "unknown candidate 'nope'"), (["--budget", "0"], "must be > 0"),
                        (["--repeats", "0"], "--repeats must be >= 1")):
        r = runner.invoke(app, ["shrink", "search", "--latency-only", *args])
        assert r.exit_code == 2 and match in r.output and "Traceback" not in r.output, r.output


def test_cli_search_prints_the_rows_verdict_and_report(toy, monkeypatch):
    import stepsaver.shrink.search

    root, result = toy
    seen = {}

    def fake_search(base, **kw):
        seen.update(kw, base=base)
        return {**result, "md": str(root / "res" / "architecture.md")}

    monkeypatch.setattr(stepsaver.shrink.search, "search", fake_search)
    r = CliRunner().invoke(app, ["shrink", "search", "-c", "minimal", "--proxy-steps", "7", "--n", "5", "--scenes",
                                 "16", "--cache", str(root / "cache"), "--out", str(root / "cli")])
    assert r.exit_code == 0, r.output
    assert "Verdict" in r.output and "architecture.md" in r.output and "minimal" in r.output
    assert seen["proxy_steps"] == 7 and seen["n"] == 5 and seen["base"].scenes == 16
    assert seen["ledger_dir"] == Path("docs/results/architecture-ledger")  # committed, so a search spans sessions
    assert [c.name for c in seen["layouts"]] == ["baseline", "minimal"]
