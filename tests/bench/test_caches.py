"""A toy ``bench caches`` run on a tiny random Flux pipeline, and its verdict rules (issue 19)."""

from __future__ import annotations

import json

import pytest

from stepsaver.bench.caches import CachesBenchConfig, bench_caches, cache_verdicts, refuse_unsupported
from stepsaver.errors import StepsaverError
from tests import helpers


def _toy(tmp_path, **kw):
    return CachesBenchConfig(**{**dict(n=2, calib_n=1, time_n=1, steps=(6,), ours_thresholds=(0.05, 0.5),
                                       drift_thresholds=(100.0,), drift_max_skips=2,
                                       fbc_thresholds=(0.2,), magcache_thresholds=(0.1,), taylorseer=((2, 1),),
                                       pab_skips=(2,), fastercache_skips=(2,), deepcache_intervals=(3,),
                                       fixed_intervals=(2,), plain_fractions=(0.5,), fid=False, adherence=False,
                                       height=32, extra_call_kwargs={"max_sequence_length": 16}, threads=1,
                                       unet_model=None,
                                       work=str(tmp_path / "work")), **kw})


def test_toy_run_has_every_method_and_writes_the_report(tmp_path, monkeypatch):
    import stepsaver.bench.caches as caches

    cfg = _toy(tmp_path, unet_model="sd15")
    unet = helpers.build_sd15()
    result = bench_caches(cfg, out_dir=tmp_path, pipe=helpers.build_flux(), unet_pipe=unet, progress=False)
    flux = [r for r in result["rows"] if r["model"] == "tiny-flux"]
    kinds = [r["kind"] for r in flux]
    assert set(kinds) == {"full", "plain", "ours", "drift", "fixed", "fbc", "magcache", "taylorseer", "pab",
                          "fastercache", "iso"}
    by = {r["method"]: r for r in flux}
    full = by["full"]
    assert full["denoiser_calls"] == 12 and full["speedup"] == 1.0  # true CFG: two transformer calls a step
    assert by["ours (threshold=0.5)"]["denoiser_calls"] < 12  # ours skips whole calls
    assert by["FirstBlockCache (threshold=0.2)"]["denoiser_calls"] == 12  # a block cache calls every step
    assert by["fixed interval (interval=2)"]["denoiser_calls"] == 10  # warm-up 4 steps, then steps 5 of 6: 2 x 5
    # a huge threshold reuses whenever C_max allows: steps 4 and 5 of 6 skipped, 2 x 4 calls
    assert by["ours, drift rule (threshold=100, max_skips=2)"]["denoiser_calls"] == 8
    assert all(r["gmacs_per_image"] > 0 and r["median_latency_ms"] > 0 for r in result["rows"])
    assert any("ours (threshold=0.5)" in r["iso_of"] for r in flux if r["kind"] == "iso")
    # The UNet half: only what runs on a UNet, with its own verdicts.
    assert {r["kind"] for r in result["rows"] if r["model"] == "sd15"} <= {"full", "plain", "ours", "drift", "fixed",
                                                                          "iso", "pab", "deepcache"}
    assert {"pab", "deepcache", "fixed"} <= {r["kind"] for r in result["rows"] if r["model"] == "sd15"}
    payload = json.loads((tmp_path / "caches.json").read_text())
    assert len(payload["magcache_ratios"]["6"]) == 6
    assert {"steps_6", "sd15_steps_6", "steps_6_drift"} <= set(payload["targets"])
    assert (tmp_path / "caches.png").stat().st_size > 0 and "## Targets" in (tmp_path / "caches.md").read_text()
    # A second run on the same work folder renders no image again and scores no row again (only
    # timing and memory call the pipeline), and gets the same quality numbers.
    renders = []
    real = caches._render
    monkeypatch.setattr(caches, "_render", lambda *a, **k: renders.append(a[1]) or real(*a, **k))
    again = bench_caches(_toy(tmp_path, unet_model=None, retime=True), out_dir=tmp_path / "again",
                         pipe=helpers.build_flux(), progress=False)
    n_methods = len(flux)
    assert len(renders) == 3 * n_methods  # retimed: warm-up, one timed (time_n 1), memory; no renders, no MACs
    assert [r["psnr_db"] for r in again["rows"]] == [r["psnr_db"] for r in flux]
    assert [r["gmacs_per_image"] for r in again["rows"]] == [r["gmacs_per_image"] for r in flux]
    assert all(r["timed_at"] >= f["timed_at"] for r, f in zip(again["rows"], flux, strict=True))
    # Without --retime the block's timing comes from the ledger too: nothing calls the pipeline.
    renders.clear()
    third = bench_caches(_toy(tmp_path, unet_model=None), out_dir=tmp_path / "third", pipe=helpers.build_flux(),
                         progress=False)
    assert renders == [] and [r["speedup"] for r in third["rows"]] == [r["speedup"] for r in again["rows"]]
    assert "tiny-flux 6 steps at " in (tmp_path / "third" / "caches.md").read_text()
    # Another scoring setting is scored again (MACs averaged over two prompts: two renders a row);
    # the timing, which does not depend on it, is not redone.
    renders.clear()
    bench_caches(_toy(tmp_path, unet_model=None, macs_n=2), out_dir=tmp_path / "macs", pipe=helpers.build_flux(),
                 progress=False)
    assert len(renders) == 2 * n_methods
    # Another thread count is another measurement: the block is timed again.
    renders.clear()
    bench_caches(_toy(tmp_path, unet_model=None, threads=2), out_dir=tmp_path / "two", pipe=helpers.build_flux(),
                 progress=False)
    assert len(renders) == 3 * n_methods


def test_a_busy_work_folder_is_refused(tmp_path):
    from stepsaver.files import exclusive_folder

    with exclusive_folder(tmp_path / "work" / "tiny-flux"), \
            pytest.raises(StepsaverError, match="in use by another bench caches"):
        bench_caches(_toy(tmp_path), out_dir=tmp_path, pipe=helpers.build_flux(), progress=False)
    with pytest.raises(StepsaverError, match="needs a model"):
        bench_caches(_toy(tmp_path, model=None), pipe=None, progress=False)
    with pytest.raises(StepsaverError, match="--render-only fills the render cache"):
        bench_caches(_toy(tmp_path, render_only=True, work=None), progress=False)
    with pytest.raises(StepsaverError, match="two stages"):
        bench_caches(_toy(tmp_path, render_only=True, score_only=True), progress=False)


def test_render_only_runs_share_a_model_folder_by_folder_and_keep_magcache_ratios(tmp_path, monkeypatch):
    import threading

    import stepsaver.bench.caches as caches
    from stepsaver.bench.caches import CacheMethod, _Renders
    from stepsaver.files import exclusive_folder

    cfg = _toy(tmp_path, render_only=True, ours_thresholds=(), fbc_thresholds=(), taylorseer=(), pab_skips=(),
               fastercache_skips=(), fixed_intervals=(), drift_thresholds=())
    pipe = helpers.build_flux()
    calibrations = []
    real = caches.calibrate_magcache
    monkeypatch.setattr(caches, "calibrate_magcache", lambda *a, **k: calibrations.append(1) or real(*a, **k))
    renders = _Renders(tmp_path / "work", pipe, "tiny-flux", cfg)
    full = CacheMethod("full", 6)
    with renders.lock(full, None, wait=False) as mine:
        with renders.lock(full, None, wait=False) as theirs:
            assert mine and not theirs  # a held render folder is not taken twice
    # Another renderer holds the full-step folder: this run renders the rest first, then waits.
    order = []
    real_render = caches._render
    monkeypatch.setattr(caches, "_render", lambda p, m, *a, **k: order.append(m.kind) or real_render(p, m, *a, **k))
    held, release = threading.Event(), threading.Event()

    def other_renderer():
        with exclusive_folder(tmp_path / "work" / renders.folder(full, None)):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=other_renderer)
    thread.start()
    held.wait(10)
    threading.Timer(1.0, release.set).start()
    bench_caches(cfg, out_dir=tmp_path, pipe=pipe, progress=False)
    thread.join()
    assert order[0] != "full" and order[-2:] == ["full", "full"]  # two prompts, rendered after the others
    # MagCache was calibrated once; a second run reads its ratios back and renders nothing.
    order.clear()
    bench_caches(cfg, out_dir=tmp_path, pipe=pipe, progress=False)
    assert len(calibrations) == 1 and order == []
    assert len(json.loads((tmp_path / "work" / "tiny-flux" / "magcache.json").read_text())) == 1
    # --score-only scores every row (MACs: one render each) and times nothing
    bench_caches(_toy(tmp_path, score_only=True, ours_thresholds=(), fbc_thresholds=(), taylorseer=(),
                      pab_skips=(), fastercache_skips=(), fixed_intervals=(), drift_thresholds=()), out_dir=tmp_path,
                 pipe=pipe, progress=False)
    assert sorted(order) == ["full", "magcache", "plain"] and not (tmp_path / "caches.json").exists()
    assert len(json.loads((tmp_path / "work" / "tiny-flux" / "scores.json").read_text())) == 3


def _r(kind, speedup, psnr, lpips, method=None, iso_of=()):
    return {"steps": 28, "kind": kind, "method": method or kind, "speedup": speedup, "psnr_db": psnr,
            "lpips": lpips, "iso_of": list(iso_of)}


def test_verdicts_compare_at_equal_or_greater_speedup_and_against_iso_cost():
    rows = [_r("ours", 2.0, 35.0, 0.02, "ours a"), _r("fbc", 1.8, 40.0, 0.01), _r("pab", 2.2, 30.0, 0.05),
            _r("iso", 2.0, 33.0, 0.03, "iso 14", iso_of=["ours a"])]
    v = cache_verdicts(rows)["steps_28"]
    assert v["holds"] is True  # fbc is better but slower than ours: not a loss
    rows.append(_r("taylorseer", 2.5, 36.0, 0.015))
    v = cache_verdicts(rows)["steps_28"]
    assert v["holds"] is False and "taylorseer" in v["text"]
    rows = [_r("ours", 2.0, 35.0, 0.02, "ours a"), _r("iso", 2.0, 36.0, 0.01, "iso 14", iso_of=["ours a"])]
    assert cache_verdicts(rows)["steps_28"]["iso_losses"] == ["ours a vs iso 14"]
    assert cache_verdicts([_r("ours", 4.0, 30.0, 0.1)])["steps_28"]["holds"] is None  # outside the band
    # The drift rule gets its own verdict against the same rivals; the criterion's is unchanged by it.
    rows = [_r("ours", 2.0, 35.0, 0.02, "ours a"), _r("drift", 2.0, 38.0, 0.012, "drift a"),
            _r("fixed", 2.1, 37.0, 0.015)]
    v = cache_verdicts(rows)
    assert v["steps_28"]["holds"] is False and v["steps_28_drift"]["holds"] is True
    assert "drift rule" in v["steps_28_drift"]["text"] and "steps_28_drift" not in cache_verdicts(rows[:1])


def test_a_model_without_cache_mixin_is_refused_with_the_reason():
    with pytest.raises(StepsaverError, match="CacheMixin.*UNet2DConditionModel.*tiny-flux"):
        refuse_unsupported(helpers.build_sd15(), ["fbc", "ours"])
    refuse_unsupported(helpers.build_sd15(), ["ours", "plain"])  # ours alone runs anywhere


def test_bad_settings_are_one_line_errors():
    for kwargs, match in (({"n": 1}, "--n must be >= 2"), ({"steps": (3,)}, "--steps"),
                          ({"guidance": float("nan")}, "--guidance"), ({"time_n": 0}, "--time-n")):
        with pytest.raises(StepsaverError, match=match):
            CachesBenchConfig(**kwargs).validate()


def test_a_changed_skip_default_renders_our_rows_again(tmp_path, monkeypatch):
    """Our rows' knobs name only what they sweep; a changed default of Skip must change their folder."""
    import stepsaver.bench.caches as caches
    from stepsaver.bench.caches import CacheMethod, _Renders

    renders = _Renders(tmp_path, helpers.build_flux(), "tiny-flux", _toy(tmp_path))
    ours = CacheMethod("ours", 28, (("threshold", 0.01),))
    drift = CacheMethod("drift", 28, (("threshold", 0.1), ("max_skips", 6)))
    plain = CacheMethod("plain", 28, (("steps", 10),))
    before = {m: renders.folder(m, None) for m in (ours, drift, plain)}
    assert ours.implicit_skip_settings() == {} == plain.implicit_skip_settings()
    monkeypatch.setitem(caches.KEYED_SKIP_DEFAULTS, "max_skips", 6)  # as if the default C_max had been 6
    assert ours.implicit_skip_settings() == {"max_skips": 4}
    assert renders.folder(ours, None) != before[ours]
    assert renders.folder(drift, None) == before[drift]  # its C_max is a knob, not a default
    assert renders.folder(plain, None) == before[plain]


def test_a_ledger_carries_a_run_to_a_machine_without_its_renders(tmp_path, monkeypatch):
    """The ledger (calls and scores per row, MagCache's ratios) is what a later session on a fresh
    machine has: a row found there is never rendered again, a missing one renders its reference too."""
    import shutil

    import stepsaver.bench.caches as caches

    small = dict(ours_thresholds=(0.5,), drift_thresholds=(), fbc_thresholds=(), taylorseer=(), pab_skips=(),
                 fastercache_skips=(), fixed_intervals=(), magcache_thresholds=(0.1,))
    ledger = tmp_path / "ledger"
    pipe = helpers.build_flux()
    first = bench_caches(_toy(tmp_path, ledger=str(ledger), **small), out_dir=tmp_path / "a", pipe=pipe,
                         progress=False)
    assert (ledger / "tiny-flux" / "scores.json").exists() and (ledger / "tiny-flux" / "magcache.json").exists()
    assert not (tmp_path / "work" / "tiny-flux" / "scores.json").exists()
    shutil.rmtree(tmp_path / "work")  # the fresh machine: renders gone, ledger committed
    seen = []
    real = caches._render
    monkeypatch.setattr(caches, "_render", lambda p, m, *a, **k: seen.append(m.kind) or real(p, m, *a, **k))
    monkeypatch.setattr(caches, "calibrate_magcache", lambda *a, **k: pytest.fail("MagCache recalibrated"))
    again = bench_caches(_toy(tmp_path, ledger=str(ledger), **small), out_dir=tmp_path / "b", pipe=pipe,
                         progress=False)
    assert seen == []  # no render, no score, and the block's timing is in the ledger too
    key = ("method", "denoiser_calls", "psnr_db", "lpips", "gmacs_per_image")
    assert [[r[k] for k in key] for r in again["rows"]] == [[r[k] for k in key] for r in first["rows"]]
    # A new sweep point renders itself and its full-step reference (2 prompts each) and nothing else.
    seen.clear()
    shutil.rmtree(tmp_path / "work")
    grown = bench_caches(_toy(tmp_path, ledger=str(ledger), **{**small, "fixed_intervals": (2,)}),
                         out_dir=tmp_path / "c", pipe=pipe, progress=False)
    rendered = seen[: len(seen) - 3 * len(grown["rows"]) - 1]  # less timing, memory and the one MACs render
    assert sorted(rendered) == ["fixed", "fixed", "full", "full"]
    # No work folder at all: the ledger alone still keeps the rows.
    seen.clear()
    bench_caches(_toy(tmp_path, ledger=str(ledger), work=None, **small), out_dir=tmp_path / "d", pipe=pipe,
                 progress=False)
    assert seen == []
    assert {"scores.json", "magcache.json", "timing.json"} <= {p.name for p in (ledger / "tiny-flux").iterdir()}


def test_equal_calls_interpolates_the_timer_and_plain_curves():
    from stepsaver.bench.caches import equal_calls

    def row(kind, calls, psnr, lpips, method=None):
        return {"model": "m", "steps": 28, "kind": kind, "method": method or f"{kind} {calls}",
                "denoiser_calls": calls, "psnr_db": psnr, "lpips": lpips}

    rows = [row("full", 28, None, 0.0), row("fixed", 8, 35.0, 0.015), row("fixed", 12, 45.0, 0.005),
            row("plain", 7, 30.0, 0.046), row("iso", 10, 33.5, 0.030), row("plain", 11, 35.0, 0.025),
            row("drift", 11.0, 42.9, 0.004, "drift a"), row("ours", 10.0, 39.0, 0.012, "ours a"),
            row("ours", 20.0, 50.0, 0.001, "ours far")]
    by = {r["method"]: r for r in equal_calls(rows)}
    assert set(by) == {"drift a", "ours a", "ours far"}  # only our adaptive rows
    a = by["drift a"]
    assert a["fixed_psnr_db"] == pytest.approx(42.5) and a["fixed_lpips"] == pytest.approx(0.0075)
    assert a["plain_psnr_db"] == pytest.approx(35.0) and a["vs_fixed"] == "better" and a["vs_plain"] == "better"
    assert by["ours a"]["fixed_psnr_db"] == pytest.approx(40.0) and by["ours a"]["vs_fixed"] == "worse"
    assert by["ours far"]["fixed_psnr_db"] is None and by["ours far"]["vs_fixed"] == "n/a"  # outside the curve
    rows.append(row("drift", 7.9, 35.5, 0.014, "drift near"))  # 1.3% under the curve's first point: equal calls
    near = {r["method"]: r for r in equal_calls(rows)}["drift near"]
    assert near["fixed_psnr_db"] == 35.0 and near["vs_fixed"] == "better"
    assert near["plain_psnr_db"] == pytest.approx(31.05)  # inside the plain curve: interpolated as usual
