"""``stepsaver optimize`` (issue 21, part 1): levers, the keep/drop rule, the saved folder, Skip on top.

Latencies are injected (:class:`FixedTimer`) wherever a verdict is asserted, so keep/drop is
deterministic; quality is always measured for real (PSNR/LPIPS of the final images vs eager fp32).
The real Inductor compile takes minutes on two cores: the compile lever runs here with the
project's counting dynamo backend (real tracing and guards, eager kernels), and with Inductor
only when ``STEPSAVER_INDUCTOR_TESTS=1``.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stepsaver.errors import StepsaverError
from stepsaver.shrink import optimize as opt
from tests import helpers

PROMPTS = ["a red square", "a green circle"]  # under the 16 tokens of the tiny CLIP
STEPS = 3
EXACT = ("channels_last", "onnxruntime", "openvino")  # same arithmetic up to float reordering


class FixedTimer:
    """Eager takes 10 ms a call; a lever 5 ms unless ``latency`` says otherwise. Each candidate still runs once."""

    def __init__(self, latency: dict[str, float] | None = None) -> None:
        self.latency = latency or {}
        self.seen: list[tuple[str, str]] = []

    def pair(self, lever, part, eager, candidate):
        candidate()
        self.seen.append((lever, part))
        return 0.010, self.latency.get(lever, 0.005)


@pytest.fixture(autouse=True)
def _one_thread():
    with helpers.one_torch_thread():
        yield


@pytest.fixture(scope="module")
def every_lever():
    """All levers but compile on a tiny random SD-1.5 pipeline, in one run (as `stepsaver optimize` does)."""
    torch.set_num_threads(1)
    pipe = helpers.build_sd15()
    names = [n for n in opt.LEVERS if n != "compile"]
    result = opt.optimize_pipeline(pipe, PROMPTS[:1], levers=names, steps=STEPS, timer=FixedTimer())
    return pipe, result, {r["lever"]: r for r in result.levers}


def _record_or_skip(records: dict, name: str) -> dict:
    record = records[name]
    if record["status"] == "unavailable":
        pytest.skip(f"{name}: {record['reason']}")
    assert record["status"] != "failed", record["reason"]
    return record


@pytest.mark.parametrize("name", [n for n in opt.LEVERS if n not in ("compile", "optimum_intel")])
def test_each_lever_builds_runs_and_is_judged_on_a_tiny_pipeline(every_lever, name):
    _, _, records = every_lever
    record = _record_or_skip(records, name)
    assert record["speedup"] == pytest.approx(2.0)
    assert len(record["psnr_per_prompt"]) == 1
    assert np.isfinite(record["psnr_min"]) and 0 <= record["lpips_max"] < 1
    if name in EXACT:
        assert record["status"] == "kept", record["reason"]
        assert record["psnr_min"] >= 60 and record["lpips_max"] < 1e-3
    elif record["status"] == "dropped":
        assert record["reason"].startswith("quality lost"), record["reason"]


def test_selective_int8_keeps_the_sensitive_layers_in_float(every_lever):
    _, _, records = every_lever
    params = _record_or_skip(records, "int8_selective")["params"]["int8_selective"]
    assert params["int8_layers"] and params["float_layers"] > 0
    assert params["output_error"] <= opt.SELECTIVE_BUDGET
    worst = max(params["most_sensitive"], key=params["most_sensitive"].get)
    assert worst not in params["int8_layers"]  # the most sensitive layer stays float
    # full int8 of the same layers is far worse than the selective choice
    assert records["int8"]["psnr_min"] < _record_or_skip(records, "int8_selective")["psnr_min"]


def test_optimum_intel_is_reported_not_run(every_lever):
    _, _, records = every_lever
    assert records["optimum_intel"]["status"] == "unavailable"
    assert records["optimum_intel"]["reason"].startswith("cannot install:")


def test_kept_levers_are_combined_and_the_best_is_chosen(every_lever):
    pipe, result, records = every_lever
    kept = [n for n, r in records.items() if r["status"] == "kept"]
    assert kept
    assert result.chosen and all(n in kept for n in result.chosen)
    torch_side = [n for n in kept if opt.LEVERS[n].group in opt.STACK_ORDER]
    if len({opt.LEVERS[n].group for n in torch_side}) >= 2:
        assert result.combination is not None and result.combination["status"] in ("kept", "dropped")
        assert len({opt.LEVERS[n].group for n in result.combination["levers"]}) == len(result.combination["levers"])
    # the pipeline came back exactly as it went in
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and type(pipe.vae.decoder).__name__ == "Decoder"
    assert pipe._progress_bar_config == {}
    payload = result.to_dict()
    json.dumps(payload)  # everything in optimize.json is plain JSON
    assert payload["machine"]["torch"] == torch.__version__ and "cpu_flags" in payload["machine"]


# ---- the keep/drop rule, with made-up levers ------------------------------------------------------
class _Perturbed(opt._Wrapper):
    """The denoiser with a deterministic error added to its output: fast (as injected) but lossy."""

    def forward(self, *args, **kwargs):
        return opt._map_tensors(self.inner(*args, **kwargs), lambda t: t + 0.5 * torch.sin(40 * t))


class _Broken(opt._Wrapper):
    def forward(self, *args, **kwargs):
        raise RuntimeError("kernel not available for this shape")


def _wrap(cls):
    def apply(parts, ctx):
        parts.denoiser = cls(parts.denoiser)
        return {}
    return apply


def _identity(parts, ctx):
    return {}


def _raises(parts, ctx):
    raise ValueError("cannot build: unsupported layer\nsecond line of a long traceback")


@pytest.fixture
def made_up_levers(monkeypatch):
    for lever in (opt.Lever("perturb", "adds an error", "layout", _wrap(_Perturbed), vae=False),
                  opt.Lever("slow", "changes nothing, slower", "layout", _identity, vae=False),
                  opt.Lever("good", "changes nothing, faster", "graph", _identity, vae=False),
                  opt.Lever("boom", "fails to build", "layout", _raises, vae=False),
                  opt.Lever("boom_at_run", "fails when called", "layout", _wrap(_Broken), vae=False),
                  opt.Lever("absent", "needs a package that is not here", "runtime", _identity,
                            needs="stepsaver_no_such_package")):
        monkeypatch.setitem(opt.LEVERS, lever.name, lever)


def test_lossy_lever_is_dropped_for_quality_and_slow_one_for_speed(made_up_levers):
    pipe = helpers.build_sd15()
    result = opt.optimize_pipeline(pipe, PROMPTS[:1], levers="perturb,slow,good", steps=STEPS,
                                   timer=FixedTimer({"slow": 0.020, "good": 0.004}))
    by = {r["lever"]: r for r in result.levers}
    assert by["perturb"]["status"] == "dropped" and by["perturb"]["speedup"] == pytest.approx(2.0)
    assert by["perturb"]["reason"].startswith("quality lost") and by["perturb"]["psnr_min"] < 35
    assert by["slow"]["status"] == "dropped" and by["slow"]["reason"].startswith("not faster (0.50x")
    assert by["slow"]["psnr_min"] == opt.PSNR_CAP  # lossless: dropped for speed alone
    assert by["good"]["status"] == "kept"
    assert result.chosen == ["good"] and result.combination is None


def test_a_lossless_precision_too_slow_alone_is_tried_under_the_compiler(made_up_levers, monkeypatch):
    for lever in (opt.Lever("slow_precision", "lossless, slower alone", "precision", _identity, vae=False),
                  opt.Lever("lossy_precision", "fast, lossy", "precision", _wrap(_Perturbed), vae=False)):
        monkeypatch.setitem(opt.LEVERS, lever.name, lever)
    pipe = helpers.build_sd15()
    timer = FixedTimer({"slow_precision": 0.020, "good": 0.004, "slow_precision+good": 0.002})
    result = opt.optimize_pipeline(pipe, PROMPTS[:1], levers="slow_precision,lossy_precision,good", steps=STEPS,
                                   timer=timer)
    by = {r["lever"]: r for r in result.levers}
    assert by["slow_precision"]["status"] == "dropped" and by["lossy_precision"]["status"] == "dropped"
    assert result.combination["levers"] == ["slow_precision", "good"]  # never the lossy one
    assert result.combination["status"] == "kept" and result.chosen == ["slow_precision", "good"]
    # without a kept compiler a precision that lost alone is not tried again
    result = opt.optimize_pipeline(pipe, PROMPTS[:1], levers="slow_precision,slow", steps=STEPS,
                                   timer=FixedTimer({"slow_precision": 0.020, "slow": 0.020}))
    assert result.combination is None and result.chosen == []


def test_failing_levers_are_reported_and_skipped_never_fatal(made_up_levers):
    pipe = helpers.build_sd15()
    result = opt.optimize_pipeline(pipe, PROMPTS[:1], levers=["boom", "boom_at_run", "absent", "good"],
                                   steps=STEPS, timer=FixedTimer())
    by = {r["lever"]: r for r in result.levers}
    assert by["boom"] == {**by["boom"], "status": "failed", "reason": "ValueError: cannot build: unsupported layer"}
    assert by["boom_at_run"]["status"] == "failed"
    assert by["boom_at_run"]["reason"] == "RuntimeError: kernel not available for this shape"
    assert by["absent"]["status"] == "unavailable" and "not installed" in by["absent"]["reason"]
    assert by["good"]["status"] == "kept" and result.chosen == ["good"]


def test_bad_input_is_one_line():
    pipe = helpers.build_sd15()
    with pytest.raises(StepsaverError, match="unknown lever 'warp'"):
        opt.optimize_pipeline(pipe, PROMPTS, levers="channels_last,warp")
    with pytest.raises(StepsaverError, match="at least one calibration prompt"):
        opt.optimize_pipeline(pipe, [], levers="channels_last")
    with pytest.raises(StepsaverError, match="float32"):
        opt.optimize_pipeline(helpers.build_sd15().to(dtype=torch.bfloat16), PROMPTS, levers="channels_last")


# ---- exported modules stand in for the original ---------------------------------------------------
def test_exported_denoiser_returns_what_the_original_returns_at_any_batch():
    pytest.importorskip("onnxruntime")
    unet = helpers.build_sd15().unet.eval()
    wrapped = opt.ExportedModule(unet, "onnxruntime")
    torch.manual_seed(0)
    x, text = torch.randn(2, 4, 16, 16), torch.randn(2, 16, 32)
    with torch.inference_mode():
        ref = unet(x, torch.tensor(500), encoder_hidden_states=text).sample
        out = wrapped(x, torch.tensor(500), encoder_hidden_states=text)  # return_dict=True: the output class
        assert type(out) is type(unet(x, 10, encoder_hidden_states=text))
        one = wrapped(x[:1], torch.tensor(500), encoder_hidden_states=text[:1])
        as_tuple = wrapped(x, torch.tensor(500), encoder_hidden_states=text, return_dict=False)
    assert torch.allclose(out.sample, ref, atol=1e-4)
    assert torch.allclose(one.sample, ref[:1], atol=1e-4)  # batch 1 through the batch-2 graph
    assert isinstance(as_tuple, tuple) and torch.allclose(as_tuple[0], ref, atol=1e-4)
    assert wrapped.exported_graphs == 2  # return_dict True and False; batch sizes share a graph
    assert wrapped.config is unet.config and wrapped.dtype == torch.float32


def test_onnxruntime_exports_a_flux_transformer_with_rms_norm():
    """Flux's query/key RMSNorm is ``aten::rms_norm``, which opset 17 lacks; the export supplies it."""
    pytest.importorskip("onnxruntime")
    pipe = helpers.build_flux()
    pipe.set_progress_bar_config(disable=True)

    def image(prompts=("a red square",)):
        return pipe(list(prompts), num_inference_steps=2, height=32, width=32, max_sequence_length=16,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images

    ref, ref_pair = image(), image(("a red square", "a blue circle"))
    pipe.transformer = opt.ExportedModule(pipe.transformer, "onnxruntime")
    out = image()
    assert np.abs(out - ref).max() < 1e-4
    # the traced rotary embedding holds the batch size, so batch 2 gets its own graph instead of failing
    assert np.abs(image(("a red square", "a blue circle")) - ref_pair).max() < 1e-4
    assert pipe.transformer.exported_graphs == 2
    norm, x = torch.nn.RMSNorm(4, eps=1e-3).eval(), torch.randn(3, 4)
    wrapped = opt.ExportedModule(norm, "onnxruntime")  # eps and the weight reach the graph
    with torch.no_grad():
        norm.weight.mul_(2.0)
        assert torch.allclose(wrapped(x), norm(x), atol=1e-5)


class _BakedBatch(torch.nn.Module):
    """Shape arithmetic the tracer records as a constant (``int(x.shape[0])``), as in Flux's rotary reshape."""

    def forward(self, x):
        return x + x.reshape(int(x.shape[0]), -1).sum(dim=1, keepdim=True)  # baked: runs, but sums across rows


def test_a_graph_that_holds_the_batch_size_is_exported_per_batch_size():
    pytest.importorskip("onnxruntime")
    baked, x = _BakedBatch(), torch.randn(4, 6)
    wrapped = opt.ExportedModule(baked, "onnxruntime")
    with torch.inference_mode():
        for rows in (1, 4, 1, 2):
            assert torch.allclose(wrapped(x[:rows]), baked(x[:rows]), atol=1e-5)
    assert wrapped.exported_graphs == 3  # batch 1, 4 and 2; the batch-1 graph is reused
    symbolic = opt.ExportedModule(torch.nn.Linear(6, 6).eval(), "onnxruntime")
    with torch.inference_mode():
        for rows in (1, 4, 2):
            symbolic(x[:rows])
    assert symbolic.exported_graphs == 1


class _Toy(torch.nn.Module):
    """Arguments as diffusers denoisers take them: a dict of tensors, a dict of scalars, return_dict."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, sample, added_cond_kwargs=None, attention_kwargs=None, return_dict=True):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        out = self.proj(sample) * (attention_kwargs or {}).get("scale", 1.0) + added_cond_kwargs["text_embeds"]
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


def test_exported_module_flattens_nested_and_constant_arguments():
    """The flattening both runtimes share (the openvino lever runs it on a real pipeline above)."""
    pytest.importorskip("onnxruntime")
    toy = _Toy().eval()
    wrapped = opt.ExportedModule(toy, "onnxruntime")
    x, cond = torch.randn(3, 4), {"text_embeds": torch.randn(3, 4)}
    with torch.inference_mode():
        for scale in (1.0, 2.0):
            ref = toy(x, cond, {"scale": scale}).sample
            assert torch.allclose(wrapped(x, cond, {"scale": scale}).sample, ref, atol=1e-5)
        assert torch.allclose(wrapped(x[:1], {"text_embeds": cond["text_embeds"][:1]}, {"scale": 2.0},
                                      return_dict=False)[0], ref[:1], atol=1e-5)
    assert wrapped.exported_graphs == 3  # one per constant setting; batch 1 and 3 share a graph


# ---- the saved folder -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An in-memory pipeline optimised to ONNX Runtime and saved (its base goes under base/)."""
    pytest.importorskip("onnxruntime")
    torch.set_num_threads(1)
    pipe = helpers.build_sd15()
    result = opt.optimize_pipeline(pipe, PROMPTS[:1], levers="channels_last,onnxruntime", steps=STEPS,
                                   timer=FixedTimer({"onnxruntime": 0.004}))
    assert result.chosen == ["onnxruntime"]
    folder = tmp_path_factory.mktemp("optimized") / "opt"
    opt.save_optimized(result, folder, pipe)
    return pipe, folder


def test_saved_folder_loads_with_its_levers_and_matches_eager(saved):
    pipe, folder = saved
    data = json.loads((folder / "optimize.json").read_text())
    assert data["format"] == opt.FORMAT and data["chosen"] == ["onnxruntime"] and data["base"]["kind"] == "saved"
    loaded = opt.load_optimized(folder)
    assert isinstance(loaded.unet, opt.ExportedModule) and loaded.stepsaver_optimized["levers"] == ["onnxruntime"]
    from stepsaver.generation import generate

    a = generate(loaded, PROMPTS[0], steps=STEPS, seed=0, output_type="np").image
    b = generate(pipe, PROMPTS[0], steps=STEPS, seed=0, output_type="np").image
    assert np.abs(a - b).max() < 1e-3


def test_optimised_pipeline_works_with_the_skip_hook(saved):
    from stepsaver.generation import generate
    from stepsaver.skip import AdaptiveSkipConfig, enable_adaptive_skip

    loaded = opt.load_optimized(saved[1])
    enable_adaptive_skip(loaded, AdaptiveSkipConfig(threshold=0.2))
    result = generate(loaded, PROMPTS[0], steps=30, seed=0, output_type="np")
    assert result.extra["denoiser_calls_saved"] > 0
    assert result.denoiser_calls + result.extra["denoiser_calls_saved"] >= 30
    assert np.isfinite(result.image).all()


def test_skip_on_a_wrapper_runs_after_skip_ran_on_the_module_it_wraps(saved):
    """bench optimize's order (eager + Skip, then the exported denoiser + Skip): the registry left on
    the eager UNet must not be taken for the wrapper's, or the hook lands on a forward the exported
    graph never calls and Skip saves nothing (tiny-flux with OpenVINO made 100 of 100 calls)."""
    from stepsaver.generation import generate
    from stepsaver.skip import AdaptiveSkipConfig, disable_adaptive_skip, enable_adaptive_skip, skip_report

    pipe = saved[0]
    eager = pipe.unet
    config = AdaptiveSkipConfig(threshold=0.2)
    enable_adaptive_skip(pipe, config)
    eager_calls = generate(pipe, PROMPTS[0], steps=30, seed=0, output_type="np").denoiser_calls
    disable_adaptive_skip(pipe)
    assert hasattr(eager, "_diffusers_hook")  # the registry stays behind, empty
    pipe.unet = opt.ExportedModule(eager, "onnxruntime")
    try:
        assert not hasattr(pipe.unet, "_diffusers_hook")  # private state is the wrapper's own
        enable_adaptive_skip(pipe, config)
        result = generate(pipe, PROMPTS[0], steps=30, seed=0, output_type="np")
        assert skip_report(pipe) is not None and result.extra["denoiser_calls_saved"] > 0
        assert result.denoiser_calls == eager_calls < 30
        disable_adaptive_skip(pipe)
    finally:
        pipe.unet = eager


def test_generate_and_serve_open_an_optimised_folder_like_any_model(saved, tmp_path):
    from stepsaver.cli import app
    from stepsaver.serve import ServeSettings, create_app

    folder = saved[1]
    out = tmp_path / "opt.png"
    res = CliRunner().invoke(app, ["generate", PROMPTS[0], "--model", str(folder), "--steps", str(STEPS),
                                   "--skip", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert out.stat().st_size > 0 and json.loads(res.stdout)["model"] == str(folder)
    res = CliRunner().invoke(app, ["generate", PROMPTS[0], "--model", str(folder), "--device", "cuda",
                                   "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "drop --device cuda" in res.output and "Traceback" not in res.output
    with pytest.raises(StepsaverError, match="drop the dtype"):
        opt.load_model(folder, dtype="bfloat16")
    # serve's default loader goes through the same door
    from fastapi.testclient import TestClient

    with TestClient(create_app(ServeSettings(model=str(folder), workers=1, token="optimised-folder-token"))) as client:
        r = client.post("/v1/generate", json={"prompt": PROMPTS[0], "steps": STEPS},
                        headers={"Authorization": "Bearer optimised-folder-token"})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("field,value,message", [
    ("torch", "1.13.0", "torch 1.13.0"),
    ("cpu", "Some Other CPU", "CPU 'Some Other CPU'"),
    ("cpu_flags", ["avx2", "avx512f", "avx512_bf16", "amx_bf16"], "CPU flags avx2 avx512f avx512_bf16 amx_bf16"),
])
def test_folder_made_for_another_torch_or_cpu_is_refused(saved, tmp_path, field, value, message):
    folder = tmp_path / "other"
    shutil.copytree(saved[1], folder)
    data = json.loads((folder / "optimize.json").read_text())
    data["machine"][field] = value
    (folder / "optimize.json").write_text(json.dumps(data))
    with pytest.raises(StepsaverError, match="re-run `stepsaver optimize`") as info:
        opt.load_optimized(folder)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_broken_or_changed_folder_is_refused(saved, tmp_path):
    with pytest.raises(StepsaverError, match="does not exist"):
        opt.load_optimized(tmp_path / "nowhere")
    folder = tmp_path / "changed"
    shutil.copytree(saved[1], folder)
    data = json.loads((folder / "optimize.json").read_text())
    (folder / "optimize.json").write_text(json.dumps({**data, "base": {**data["base"], "fingerprint": "0" * 16}}))
    with pytest.raises(StepsaverError, match="changed since it was optimised"):
        opt.load_optimized(folder)
    (folder / "optimize.json").write_text("{not json")
    with pytest.raises(StepsaverError, match="not valid JSON"):
        opt.load_optimized(folder)


# ---- torch.compile -------------------------------------------------------------------------------------
def test_compile_lever_traces_denoiser_and_decoder_once(monkeypatch):
    """Dynamo's real tracing with eager kernels (helpers.counting_backend): one graph per module, reused."""
    torch._dynamo.reset()
    stats, backend = helpers.counting_backend()
    monkeypatch.setattr(opt, "COMPILE_BACKEND", backend)
    try:
        result = opt.optimize_pipeline(helpers.build_sd15(), PROMPTS[:1], levers="compile", steps=STEPS,
                                       timer=FixedTimer())
    finally:
        torch._dynamo.reset()
    record = result.levers[0]
    assert record["status"] == "kept", record["reason"]
    assert record["psnr_min"] >= 60 and record["vae_applied"]
    assert 1 <= stats.graphs <= 4 and stats.runs >= STEPS  # no recompile per call


@pytest.mark.skipif(os.environ.get("STEPSAVER_INDUCTOR_TESTS") != "1",
                    reason="Inductor codegen takes minutes on 2 cores; set STEPSAVER_INDUCTOR_TESTS=1 to run it")
def test_compile_lever_with_inductor():
    torch._dynamo.reset()
    result = opt.optimize_pipeline(helpers.build_sd15(), PROMPTS[:1], levers="compile", steps=STEPS,
                                   timer=FixedTimer())
    torch._dynamo.reset()
    assert result.levers[0]["status"] == "kept", result.levers[0]["reason"]


# ---- the command -----------------------------------------------------------------------------------------
def test_cli_optimize_writes_a_loadable_folder(tmp_path):
    from stepsaver.cli import app

    model = helpers.tiny_sd15(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:1]) + "\n")
    out = tmp_path / "opt"
    res = CliRunner().invoke(app, ["optimize", "--model", str(model), "--out", str(out), "--levers", "channels_last",
                                   "--prompts", str(prompts), "--steps", "2", "--repeats", "2", "--batch", "1,2",
                                   "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["levers"][0]["lever"] == "channels_last" and payload["levers"][0]["status"] in ("kept", "dropped")
    per = payload["levers"][0]["per_batch"]  # timed at both batch sizes, judged by the worse
    assert set(per) == {"1", "2"} and payload["levers"][0]["speedup"] == min(v["speedup"] for v in per.values())
    data = json.loads((out / "optimize.json").read_text())
    assert data["base"] == {"kind": "folder", "path": str(model.resolve()), "fingerprint": data["base"]["fingerprint"]}
    assert not (out / "base").exists()
    assert opt.load_optimized(out).stepsaver_optimized["levers"] == data["chosen"]


@pytest.mark.parametrize("args,message", [
    (["--levers", "channels_last,warp"], "unknown lever 'warp'"),
    (["--steps", "0"], "steps must be in 1..1000"),
    (["--prompts", "/nonexistent/prompts.txt"], "does not exist"),
    (["--batch", "1,x"], "--batch must be comma-separated integers"),
    (["--batch", "0"], "--batch needs batch sizes >= 1"),
])
def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    from stepsaver.cli import app

    res = CliRunner().invoke(app, ["optimize", "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2 and message in res.output


def test_a_lever_fast_at_batch_1_but_slow_at_a_served_batch_is_dropped():
    """Judged by the worst batch size the user serves (ONNX Runtime on the UNet: 1.93x at 1, 1.17x at 8)."""

    class ByBatch(FixedTimer):
        def pair(self, lever, part, eager, candidate):
            candidate()
            self.seen.append((lever, part))
            return 0.010, 0.020 if part == "denoiser@2" else 0.005

    timer = ByBatch()
    result = opt.optimize_pipeline(helpers.build_sd15(), PROMPTS[:1], levers="channels_last", steps=STEPS,
                                   timer=timer, batch_sizes=[1, 2])
    record = result.levers[0]
    assert ("channels_last", "denoiser") in timer.seen and ("channels_last", "denoiser@2") in timer.seen
    assert record["per_batch"][1]["speedup"] == 2.0 and record["per_batch"][2]["speedup"] == 0.5
    assert record["speedup"] == 0.5 and record["status"] == "dropped" and result.chosen == []
    assert "worst of batch 1 2.00x, batch 2 0.50x" in record["reason"]
    with pytest.raises(StepsaverError, match="batch sizes must be integers >= 1"):
        opt.optimize_pipeline(helpers.build_sd15(), PROMPTS[:1], levers="channels_last", batch_sizes=[0])
