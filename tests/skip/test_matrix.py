"""Skip on every diffusers pipeline family (issue 17): one matrix of tiny random pipelines.

Families: SD-1.5 (+ img2img, inpaint with the 9-channel UNet, ControlNet), SDXL (+ img2img),
PixArt-alpha/sigma, SD3, Flux (with and without true CFG), DiT, DDPM/DDIM (unconditional),
TextToVideoSD and I2VGenXL (2 and 4 frames), LDMTextToImage; SD-1.5 with DPMSolverSDE, Euler-a and
LCM; LoRA through peft (loaded before or after enabling, ``set_adapters``, ``fuse_lora``); and
``pipe.unet = torch.compile(pipe.unet)`` then the hook.

Cells, for every family:

* ``threshold=0`` is bit-identical to the unhooked pipeline (same seed);
* a high threshold skips (``calls_saved > 0``; few-step LCM: ``== 0`` at the default threshold),
  and the report is per sample (``batch_size`` is the number of images/videos asked for);
* the calls counted independently (a forward pre-hook on the denoiser for the pipeline's calls, one
  on its first layer for the network runs) equal the report's ``pipeline_calls`` / ``denoiser_calls``;
* a batch of 2 equals 2 single calls (paths equal, outputs to float tolerance) where paths are per sample,
  once with the criterion and once with planned per-sample skips (:class:`PlannedSkips`): on these tiny
  models both prompts mostly take the same path, so only the plan makes every family split rows;
* ``disable_adaptive_skip`` restores the original forward (output bit-identical to never enabled).

Plus: LCM at 4-8 steps saves nothing at the default threshold and says why; the compiled denoiser
stays one graph over all its cells. Every pipeline is built once per session, in memory
(``tests.helpers.build_*``), on first use (module-level caches), so the file runs in under two minutes.
The compiled family compiles through a counting dynamo backend that runs the captured graph eagerly:
dynamo's tracing, guards and recompiles are the real ones, only Inductor's code generation (about two
minutes on two cores) is left out; ``STEPSAVER_MATRIX_INDUCTOR=1`` compiles with Inductor instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from stepsaver.calls import count_denoiser_calls, denoiser_of
from stepsaver.skip import AdaptiveSkipConfig, SkipPolicy, disable_adaptive_skip, enable_adaptive_skip, skip_report
from stepsaver.skip.hook import HOOK_NAME
from tests import helpers

pytestmark = pytest.mark.filterwarnings(
    "ignore:Should have ta>=t0:UserWarning",  # torchsde's Brownian tree, float rounding at the first step
    "ignore:Already found a `peft_config`:UserWarning",  # peft, on loading a second adapter (intended here)
)

PROMPTS = ["a red cat on grass", "two blue cars"]
NEGATIVE = ["blurry", "ugly"]
CLASSES = [207, 360]  # DiT class labels of sample 0 and 1


def _image(seed: int, mask: bool = False):
    import PIL.Image

    if mask:
        a = np.zeros((32, 32), dtype=np.uint8)
        a[8:24, 8:24] = 255
        return PIL.Image.fromarray(a)
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8))


IMAGE, MASK = _image(0), _image(0, mask=True)


def _tensor(out: Any) -> torch.Tensor:
    value = getattr(out, "images", None)
    if value is None:
        value = out.frames
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    assert isinstance(value, torch.Tensor), type(value)
    return value


def _gens(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


# --- how each kind of pipeline is called (prompts/classes/batch and seeds for samples 0..n-1) ----------

def call_text(extra=None, **fixed):
    """A text-to-image call; ``extra`` maps argument names to functions of the seeds (per-sample inputs)."""
    def call(pipe, seeds, steps):
        kwargs = dict(height=32, width=32, output_type="latent", guidance_scale=5.0)
        kwargs.update(fixed)
        kwargs.update({k: v(seeds) for k, v in (extra or {}).items()})  # per-sample arguments
        return pipe([PROMPTS[s] for s in seeds], num_inference_steps=steps, generator=_gens(seeds), **kwargs)
    return call


PIXART = dict(use_resolution_binning=False, clean_caption=False, max_sequence_length=16)


def call_dit(pipe, seeds, steps):
    return pipe([CLASSES[s] for s in seeds], num_inference_steps=steps, generator=_gens(seeds), guidance_scale=4.0,
                output_type="np")


def call_pixels(pipe, seeds, steps):
    return pipe(batch_size=len(seeds), num_inference_steps=steps, generator=_gens(seeds), output_type="np")


def call_video(frames, image=False):
    def call(pipe, seeds, steps):
        kwargs = dict(num_frames=frames, height=32, width=32, output_type="latent", guidance_scale=5.0)
        if image:  # I2VGenXL: clip_skip=None (its clip_skip path reads text_model, gone in transformers 5)
            kwargs.update(image=[IMAGE] * len(seeds), clip_skip=None)
        return pipe([PROMPTS[s] for s in seeds], num_inference_steps=steps, generator=_gens(seeds), **kwargs)
    return call


def call_ldm(pipe, seeds, steps):
    return pipe([PROMPTS[s] for s in seeds], num_inference_steps=steps, generator=_gens(seeds), guidance_scale=5.0,
                height=128, width=128, output_type="pt")


# --- pipelines that are an SD-1.5 with something done to it -----------------------------------------

def with_scheduler(build, name):
    """``build`` with its scheduler swapped for DPMSolverSDE (seeded Brownian tree), Euler-a or LCM."""
    def build_swapped():
        from diffusers import DPMSolverSDEScheduler, EulerAncestralDiscreteScheduler, LCMScheduler

        pipe = build()
        cls, kwargs = {"dpm_sde": (DPMSolverSDEScheduler, {"noise_sampler_seed": 0}),
                       "euler_a": (EulerAncestralDiscreteScheduler, {}), "lcm": (LCMScheduler, {})}[name]
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **kwargs)
        return pipe
    return build_swapped


def sd15_lora(*names, fuse=False):
    def build():
        pipe = helpers.build_sd15()
        for i, name in enumerate(names):
            pipe.load_lora_weights(helpers.tiny_lora_state_dict(seed=i + 1), adapter_name=name)
        if len(names) > 1:
            pipe.set_adapters(list(names), adapter_weights=[0.5, 1.0])
        if fuse:
            pipe.fuse_lora()
        return pipe
    return build


def attach_only(pipe, attach):
    attach()


def attach_then_load_lora(pipe, attach):
    """The LoRA the pipeline was built with is unloaded, the hook attached, then the LoRA loaded again."""
    pipe.unload_lora_weights()
    attach()
    pipe.load_lora_weights(helpers.tiny_lora_state_dict(seed=1), adapter_name="a")


def attach_then_set_adapters(pipe, attach):
    """set_adapters while the hook is on: one adapter, then back to the blend the pipeline was built with."""
    attach()
    pipe.set_adapters("a")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 1.0])


def build_compiled():
    """SD-1.5 with ``pipe.unet = torch.compile(pipe.unet)`` (counting backend, see the module docstring)."""
    pipe = helpers.build_sd15()
    stats, backend = helpers.counting_backend()
    pipe.unet = torch.compile(pipe.unet, backend=backend)
    pipe.__dict__["_matrix_compile_stats"] = stats
    return pipe


# --- the families ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Family:
    build: Callable[[], Any]
    call: Callable[[Any, list[int], int], Any]
    steps: int = 12
    ran_steps: int | None = None  # scheduler steps that run (img2img strength 0.75); None = steps
    calls_per_step: int | None = 1  # denoiser calls per scheduler step (true CFG: 2); None = not fixed (SDE)
    threshold: float = 0.5
    per_sample: bool = True  # a batch of 2 follows the paths of 2 single calls
    few_step: bool = False  # LCM: never skips at the default threshold
    setup: Callable[[Any, Callable[[], Any]], Any] = attach_only  # (pipe, attach): when the hook is attached

    @property
    def expected_steps(self) -> int:
        return self.steps if self.ran_steps is None else self.ran_steps

    def config(self, threshold: float | None = None) -> AdaptiveSkipConfig:
        """The criterion at the family's high threshold (the default config for few-step LCM), or ``threshold``.

        The criterion's thresholds here were set per family on these random weights; the default rule
        (drift) gets its own cells (``test_the_default_rule_skips_...``) at ``DRIFT_HIGH``.
        """
        if threshold is None:
            return AdaptiveSkipConfig() if self.few_step else \
                AdaptiveSkipConfig(threshold=self.threshold, rule="criterion")
        return AdaptiveSkipConfig(threshold=threshold, rule="criterion")

    def enable(self, pipe, config: AdaptiveSkipConfig) -> None:
        self.setup(pipe, lambda: enable_adaptive_skip(pipe, config))


IMG2IMG = {"image": lambda seeds: [IMAGE] * len(seeds)}
INPAINT = dict(IMG2IMG, mask_image=lambda seeds: [MASK] * len(seeds))
TRUE_CFG = {"negative_prompt": lambda seeds: [NEGATIVE[s] for s in seeds]}
FAMILIES: dict[str, Family] = {
    "sd15": Family(helpers.build_sd15, call_text()),
    "sd15_img2img": Family(helpers.build_sd_img2img, call_text(IMG2IMG, strength=0.75), ran_steps=9),
    "sd15_inpaint": Family(helpers.build_sd_inpaint, call_text(INPAINT)),
    "sd15_controlnet": Family(helpers.build_sd_controlnet, call_text(image=IMAGE)),
    "sdxl": Family(helpers.build_sdxl, call_text()),
    "sdxl_img2img": Family(helpers.build_sdxl_img2img, call_text(IMG2IMG, strength=0.75), ran_steps=9),
    "pixart_alpha": Family(helpers.build_pixart_alpha, call_text(**PIXART)),
    "pixart_sigma": Family(helpers.build_pixart_sigma, call_text(**PIXART)),
    "sd3": Family(helpers.build_sd3, call_text(max_sequence_length=16)),
    "flux": Family(helpers.build_flux, call_text(max_sequence_length=16)),
    "flux_true_cfg": Family(helpers.build_flux, call_text(TRUE_CFG, max_sequence_length=16, true_cfg_scale=2.0),
                            calls_per_step=2),
    "dit": Family(helpers.build_dit, call_dit),
    "ddpm": Family(helpers.build_ddpm, call_pixels),
    "ddim": Family(helpers.build_ddim, call_pixels),
    "t2v_2_frames": Family(helpers.build_text_to_video, call_video(2), steps=10),
    # Euler-a draws its noise for the (videos * frames) batch the video pipelines hand to scheduler.step, which a
    # list of per-video generators cannot serve (diffusers' randn_tensor: IndexError, hook or not): no batch cell
    "t2v_4_frames_euler_a": Family(with_scheduler(helpers.build_text_to_video, "euler_a"), call_video(4), steps=10,
                                   per_sample=False),
    "i2vgenxl_2_frames": Family(helpers.build_i2vgenxl, call_video(2, image=True), steps=10),
    "i2vgenxl_4_frames_euler_a": Family(with_scheduler(helpers.build_i2vgenxl, "euler_a"),
                                        call_video(4, image=True), steps=10, per_sample=False),
    "ldm_text2img": Family(helpers.build_ldm_text_to_image, call_ldm),
    # the Brownian-tree noise of DPMSolverSDE is drawn for the whole batch, so sample i of a batch gets other
    # noise than the same seed alone: per-sample equality does not apply
    "sd15_dpm_sde": Family(with_scheduler(helpers.build_sd15, "dpm_sde"), call_text(), calls_per_step=None,
                           per_sample=False),
    "sd15_euler_a": Family(with_scheduler(helpers.build_sd15, "euler_a"), call_text()),
    "sd15_lcm": Family(with_scheduler(helpers.build_sd15, "lcm"), call_text(guidance_scale=1.0), steps=6,
                       few_step=True),
    "sd15_lora_before": Family(sd15_lora("a"), call_text()),
    "sd15_lora_after": Family(sd15_lora("a"), call_text(), setup=attach_then_load_lora),
    "sd15_lora_set_adapters": Family(sd15_lora("a", "b"), call_text(), setup=attach_then_set_adapters),
    "sd15_lora_fused": Family(sd15_lora("a", fuse=True), call_text()),
    # a batch of 2 is another input shape: dynamo would compile a second graph, so no batch cell here
    "sd15_compiled": Family(build_compiled, call_text(), per_sample=False),
}
PER_SAMPLE = [name for name, fam in FAMILIES.items() if fam.per_sample]


# --- building, running, counting ------------------------------------------------------------------

_PIPES: dict[str, Any] = {}
_REFS: dict[str, torch.Tensor] = {}
_HIGH: dict[str, Any] = {}


def _pipe(name: str):
    if name not in _PIPES:
        pipe = FAMILIES[name].build()
        pipe.set_progress_bar_config(disable=True)
        _PIPES[name] = pipe
    return _PIPES[name]


def generate(name: str, seeds=(0,), steps: int | None = None) -> torch.Tensor:
    fam = FAMILIES[name]
    torch.manual_seed(1234)  # pipelines that draw from the global RNG (I2VGenXL's image latents)
    with torch.no_grad():
        return _tensor(fam.call(_pipe(name), list(seeds), steps or fam.steps)).detach().clone()


def reference(name: str) -> torch.Tensor:
    """The unhooked pipeline's output for sample 0 (computed once, before any hook touched the family)."""
    if name not in _REFS:
        assert not _hooked(_pipe(name))
        _REFS[name] = generate(name)
    return _REFS[name]


def _hooked(pipe) -> bool:
    registry = getattr(denoiser_of(pipe), "_diffusers_hook", None)
    return registry is not None and HOOK_NAME in registry.hooks


def _first_layer(denoiser: torch.nn.Module) -> torch.nn.Module:
    for name in ("conv_in", "pos_embed", "x_embedder"):
        layer = getattr(denoiser, name, None)
        if isinstance(layer, torch.nn.Module):
            return layer
    raise AssertionError(f"no first layer known on {type(denoiser).__name__}")


@contextlib.contextmanager
def network_runs(pipe):
    """Real network runs: the denoiser's first layer runs once per forward; calls answered from the cache never
    reach it. A compiled denoiser counts the runs of its compiled graph instead (a hook inside would recompile)."""
    stats = pipe.__dict__.get("_matrix_compile_stats")
    counter = [0]
    if stats is not None:
        start = stats.runs
        try:
            yield counter
        finally:
            counter[0] = stats.runs - start
        return
    handle = _first_layer(denoiser_of(pipe)).register_forward_pre_hook(
        lambda *_: counter.__setitem__(0, counter[0] + 1))
    try:
        yield counter
    finally:
        handle.remove()


def bits(t: torch.Tensor) -> bytes:
    return t.detach().cpu().numpy().tobytes()


@pytest.fixture
def family(request):
    """The family's pipeline, with the hook off again afterwards whatever the test did."""
    name = request.param
    pipe = _pipe(name)
    assert not _hooked(pipe), "a previous cell left the hook on"
    yield name
    disable_adaptive_skip(pipe)


def high_run(name: str) -> dict:
    """One hooked call at the family's high threshold, with both independent counters (cached: two cells read it)."""
    if name not in _HIGH:
        fam, pipe = FAMILIES[name], _pipe(name)
        reference(name)
        try:
            fam.enable(pipe, fam.config())
            with count_denoiser_calls(pipe) as calls, network_runs(pipe) as runs:
                out = generate(name)
            _HIGH[name] = {"report": skip_report(pipe), "calls": calls[0], "runs": runs[0], "out": out}
        except Exception as error:  # noqa: BLE001 - replayed to every cell that reads this run
            _HIGH[name] = {"error": error}
        finally:
            disable_adaptive_skip(pipe)
    result = _HIGH[name]
    if "error" in result:
        raise result["error"]
    return result


def families(names=None):
    return pytest.mark.parametrize("family", list(names or FAMILIES), indirect=True)


# --- the matrix -----------------------------------------------------------------------------------

@families()
def test_threshold_zero_is_bit_identical_to_the_unhooked_pipeline(family):
    fam, pipe = FAMILIES[family], _pipe(family)
    ref = reference(family)
    fam.enable(pipe, AdaptiveSkipConfig(threshold=0.0))
    with count_denoiser_calls(pipe) as calls, network_runs(pipe) as runs:
        same = generate(family)
    report = skip_report(pipe)
    assert bits(same) == bits(ref)
    assert report.calls_saved == 0 and report.pipeline_calls == report.denoiser_calls == calls[0] == runs[0]
    assert report.batch_size == 1 and report.steps == fam.expected_steps


@families()
def test_a_high_threshold_skips_and_reports_per_sample(family):
    fam = FAMILIES[family]
    result = high_run(family)
    report = result["report"]
    assert report.batch_size == 1, f"one sample asked for, the report has {report.batch_size}"
    assert report.steps == fam.expected_steps and len(report.path()) == fam.expected_steps
    if fam.few_step:
        assert report.calls_saved == 0
        return
    assert report.calls_saved > 0
    assert report.skipped_steps()[0] >= report.warmup
    assert not torch.equal(result["out"], reference(family))


@families()
def test_calls_counted_independently_equal_the_report(family):
    fam = FAMILIES[family]
    result = high_run(family)
    report = result["report"]
    assert result["calls"] == report.pipeline_calls  # every call reaches the module; the hook answers some
    assert result["runs"] == report.denoiser_calls  # the network runs the report claims are the ones that ran
    assert report.calls_of(0) == result["runs"] and report.saved_of(0) == report.calls_saved
    if fam.calls_per_step is not None:  # the path says what ran: k calls per computed step, none per skipped one
        computed_steps = report.steps - len(report.skipped_steps())
        assert report.pipeline_calls == fam.calls_per_step * report.steps
        assert report.denoiser_calls == fam.calls_per_step * computed_steps


@families(PER_SAMPLE)
def test_a_batch_of_two_equals_two_single_calls(family):
    fam, pipe = FAMILIES[family], _pipe(family)
    fam.enable(pipe, fam.config())
    with network_runs(pipe) as runs:
        batch = generate(family, seeds=(0, 1))
    report = skip_report(pipe)
    assert report.batch_size == 2 and report.steps == fam.expected_steps
    assert runs[0] == report.denoiser_calls
    if not fam.few_step:
        assert report.calls_saved > 0
    for i in (0, 1):
        alone = generate(family, seeds=(i,))
        single = skip_report(pipe)
        assert single.batch_size == 1
        assert report.path(i) == single.path(0), f"sample {i}: batch path differs from its single call's"
        assert report.calls_of(i) == single.denoiser_calls and report.saved_of(i) == single.calls_saved
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-4, atol=1e-4)


class PlannedSkips(SkipPolicy):
    """Per-sample skips given in advance (sample ``i`` reuses the cache at the steps in ``plans[i]``): mixed steps
    on every family whatever the criterion decides, so the row splitting and splicing always runs."""

    per_sample = True

    def __init__(self, plans: list[set[int]]) -> None:
        self.plans = plans

    def decide(self, diffs, path, batch):
        assert batch == len(self.plans), f"the hook sees {batch} samples, {len(self.plans)} were asked for"
        return [len(path) in plan for plan in self.plans]  # path holds steps 0..j: this decides step j + 1


PLANS = [{4, 5, 7}, {5, 6, 8}]  # steps 4, 6, 7, 8 mix a computing and a skipping sample


def attach_planned(pipe, plans):
    from diffusers.hooks import HookRegistry

    from stepsaver.skip.hook import AdaptiveSkipHook

    hook = AdaptiveSkipHook(AdaptiveSkipConfig(threshold=0.0), pipe, policy=PlannedSkips(plans))
    HookRegistry.check_if_exists_or_initialize(denoiser_of(pipe)).register_hook(hook, HOOK_NAME)
    hook.bind_scheduler(pipe.scheduler)


@families(PER_SAMPLE)
def test_a_batch_with_mixed_paths_equals_two_single_calls(family):
    """Planned skips that differ per sample: the rows of the computing sample run, the others are spliced from
    the cache, and each sample comes out as it does alone with its own plan."""
    fam, pipe = FAMILIES[family], _pipe(family)
    fam.setup(pipe, lambda: attach_planned(pipe, PLANS))
    with network_runs(pipe) as runs:
        batch = generate(family, seeds=(0, 1))
    report = skip_report(pipe)
    disable_adaptive_skip(pipe)
    k = fam.calls_per_step
    assert report.batch_size == 2
    assert report.computed == [[s not in plan for plan in PLANS] for s in range(fam.expected_steps)]
    assert runs[0] == report.denoiser_calls == k * sum(any(row) for row in report.computed)
    assert report.rows_computed < report.rows_requested
    for i in (0, 1):
        fam.setup(pipe, lambda i=i: attach_planned(pipe, [PLANS[i]]))
        alone = generate(family, seeds=(i,))
        single = skip_report(pipe)
        disable_adaptive_skip(pipe)
        assert single.path(0) == report.path(i)
        assert report.calls_of(i) == single.denoiser_calls and report.saved_of(i) == single.calls_saved
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-4, atol=1e-4)


@families()
def test_disable_restores_the_original_forward(family):
    fam, pipe = FAMILIES[family], _pipe(family)
    ref = reference(family)
    denoiser = denoiser_of(pipe)
    forward_before = denoiser.__dict__.get("forward")
    scheduler = pipe.scheduler
    fam.enable(pipe, fam.config())
    generate(family)
    assert disable_adaptive_skip(pipe) is True and disable_adaptive_skip(pipe) is False
    assert denoiser.__dict__.get("forward") is forward_before
    assert HOOK_NAME not in denoiser._diffusers_hook.hooks
    assert "step" not in scheduler.__dict__ and "set_timesteps" not in scheduler.__dict__
    assert bits(generate(family)) == bits(ref)


DRIFT_HIGH = 10.0  # random weights: a reused output is off by 40-100% (noise) or 200-600% (x0) per step


@families(PER_SAMPLE)
def test_the_default_rule_skips_and_a_batch_of_two_equals_two_single_calls(family):
    """The shipped rule (drift, reuse="auto") on every family: it skips, counts what ran, and measures each
    sample's reuse error on its own rows (a batch of two follows the paths of two single calls)."""
    fam, pipe = FAMILIES[family], _pipe(family)
    config = AdaptiveSkipConfig() if fam.few_step else AdaptiveSkipConfig(threshold=DRIFT_HIGH)
    assert config.rule == "drift"
    fam.enable(pipe, config)
    try:
        with network_runs(pipe) as runs:
            batch = generate(family, seeds=(0, 1))
        report = skip_report(pipe)
        singles = []
        for i in (0, 1):
            alone = generate(family, seeds=(i,))
            singles.append((alone, skip_report(pipe)))
    finally:
        disable_adaptive_skip(pipe)
    assert report.rule == "drift" and report.reuse in ("noise", "x0")
    assert report.batch_size == 2 and report.steps == fam.expected_steps and runs[0] == report.denoiser_calls
    assert (report.calls_saved == 0) if fam.few_step else (report.calls_saved > 0)
    for i, (alone, single) in enumerate(singles):
        assert report.path(i) == single.path(0), f"sample {i}: batch path differs from its single call's"
        assert report.calls_of(i) == single.denoiser_calls
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-4, atol=1e-4)


# --- cells of one family --------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [4, 5, 6, 7, 8])
def test_lcm_at_four_to_eight_steps_never_skips_at_the_default_threshold(steps):
    pipe = _pipe("sd15_lcm")
    enable_adaptive_skip(pipe, AdaptiveSkipConfig())
    try:
        generate("sd15_lcm", steps=steps)
        report = skip_report(pipe)
    finally:
        disable_adaptive_skip(pipe)
    assert report.steps == steps and report.calls_saved == 0 and report.denoiser_calls == steps
    assert report.why_no_savings().startswith("calls saved 0 because")  # the report says why (issue 17, item 8)


def test_the_compiled_denoiser_is_one_graph_with_no_recompiles():
    """Every cell of ``sd15_compiled`` ran the same compiled graph: the hook's decisions stay out of it."""
    pipe = _pipe("sd15_compiled")
    stats = pipe.__dict__["_matrix_compile_stats"]
    reference("sd15_compiled")
    high_run("sd15_compiled")
    enable_adaptive_skip(pipe, AdaptiveSkipConfig(threshold=0.0))
    try:
        generate("sd15_compiled")
    finally:
        disable_adaptive_skip(pipe)
    generate("sd15_compiled")
    assert stats.graphs == 1, f"{stats.graphs} graphs compiled"
