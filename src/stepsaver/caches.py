"""diffusers' own caches by a short name and its knobs: what ``bench caches`` sweeps and ``calibrate`` may pick.

diffusers 0.42.1 attaches FirstBlockCache, MagCache, TaylorSeer, PyramidAttentionBroadcast and
FasterCache through ``pipe.transformer.enable_cache(config)``, on ``CacheMixin`` denoisers only
(Flux and newer transformers; not ``UNet2DConditionModel``, SD3, PixArt or DiT). A
:class:`CacheSpec` is a frozen, hashable, JSON-able description (``"fbc"``, ``(("threshold",
0.05),)``) so that a benchmark row, a render cache key and a calibrated config file name the same
setting; :meth:`CacheSpec.diffusers_config` builds the diffusers config object from it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from stepsaver.errors import StepsaverError

__all__ = ["CACHE_KINDS", "CacheSpec", "cache_kinds_for", "deepcache_applied", "supports_caches", "unet_of"]

CACHE_KINDS = {"fbc": "FirstBlockCache", "magcache": "MagCache", "taylorseer": "TaylorSeer",
               "pab": "PAB", "fastercache": "FasterCache"}
_KNOBS = {"fbc": ("threshold",), "magcache": ("threshold",), "taylorseer": ("interval", "order"),
          "pab": ("skip",), "fastercache": ("skip",)}


def supports_caches(pipe: Any) -> bool:
    """Whether the pipeline's denoiser takes diffusers' caches (a ``CacheMixin`` transformer)."""
    from diffusers.models.cache_utils import CacheMixin

    return isinstance(getattr(pipe, "transformer", None), CacheMixin)


def unet_of(pipe: Any) -> Any:
    """The pipeline's UNet module, or ``None`` (a transformer pipeline, or a UNet slot holding something else)."""
    import torch

    unet = getattr(pipe, "unet", None)
    return unet if isinstance(unet, torch.nn.Module) else None


def cache_kinds_for(pipe: Any) -> tuple[str, ...]:
    """The caches that run on this pipeline's denoiser: all of them on a ``CacheMixin`` transformer;
    only PyramidAttentionBroadcast on a UNet, where diffusers' hook function attaches to the
    attention modules directly (``apply_pyramid_attention_broadcast``) without ``enable_cache``."""
    if supports_caches(pipe):
        return tuple(CACHE_KINDS)
    return ("pab",) if unet_of(pipe) is not None else ()


@dataclass(frozen=True)
class CacheSpec:
    """One diffusers cache with its knobs, e.g. ``CacheSpec("fbc", (("threshold", 0.05),))``."""

    kind: str
    knobs: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in CACHE_KINDS:
            raise StepsaverError(f"unknown cache {self.kind!r}; choose one of: {', '.join(CACHE_KINDS)}")
        missing = set(_KNOBS[self.kind]) - {k for k, _ in self.knobs}
        if missing:
            raise StepsaverError(f"cache {self.kind} needs {', '.join(sorted(missing))}")

    @property
    def label(self) -> str:
        knobs = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.knobs)
        return CACHE_KINDS[self.kind] + (f" ({knobs})" if knobs else "")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dict(self.knobs)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheSpec:
        if not isinstance(data, dict) or "kind" not in data:
            raise StepsaverError(f"a cache setting is an object with a 'kind' ({', '.join(CACHE_KINDS)}), got {data!r}")
        return cls(data["kind"], tuple(sorted((k, v) for k, v in data.items() if k != "kind")))

    def diffusers_config(self, pipe: Any, steps: int, mag_ratios: Sequence[float] | None = None) -> Any:
        """The diffusers config object (knobs as diffusers documents them for Flux)."""
        import diffusers

        k = dict(self.knobs)
        now = lambda: pipe.current_timestep  # noqa: E731 - the step as the pipeline sees it
        if self.kind == "fbc":
            return diffusers.FirstBlockCacheConfig(threshold=k["threshold"])
        if self.kind == "magcache":
            if mag_ratios is None:
                raise StepsaverError("MagCache needs ratios from its calibration run (calibrate_magcache)")
            return diffusers.MagCacheConfig(threshold=k["threshold"], num_inference_steps=steps,
                                            mag_ratios=list(mag_ratios))
        if self.kind == "taylorseer":
            return diffusers.TaylorSeerCacheConfig(cache_interval=k["interval"], max_order=k["order"],
                                                   disable_cache_before_step=3)
        if self.kind == "pab":
            return diffusers.PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=k["skip"], spatial_attention_timestep_skip_range=(100, 800),
                current_timestep_callback=now)
        return diffusers.FasterCacheConfig(
            spatial_attention_block_skip_range=k["skip"], spatial_attention_timestep_skip_range=(-1, 681),
            current_timestep_callback=now, attention_weight_callback=lambda _: 0.3,
            is_guidance_distilled=True)  # Flux's true CFG runs cond and uncond as separate calls

    def attach(self, pipe: Any, steps: int, mag_ratios: Sequence[float] | None = None) -> None:
        """Attach the cache and leave it on (what a served, calibrated pipeline needs); :meth:`detach`
        takes it off. A cache that cannot run on this denoiser is refused with the reason."""
        if self.kind == "pab" and not supports_caches(pipe) and unet_of(pipe) is not None:
            _attach_unet_pab(pipe, dict(self.knobs)["skip"])
            return
        if not supports_caches(pipe):
            denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
            raise StepsaverError(f"{CACHE_KINDS[self.kind]} needs a CacheMixin denoiser (Flux-layout transformers); "
                                 f"this pipeline's is {type(denoiser).__name__}")
        pipe.transformer.enable_cache(self.diffusers_config(pipe, steps, mag_ratios))

    @staticmethod
    def detach(pipe: Any) -> None:
        """Take off whatever :meth:`attach` put on (nothing attached: nothing to do)."""
        if _detach_unet_pab(pipe):
            return
        if supports_caches(pipe) and getattr(pipe.transformer, "is_cache_enabled", False):
            pipe.transformer.disable_cache()

    @contextlib.contextmanager
    def applied(self, pipe: Any, steps: int, mag_ratios: Sequence[float] | None = None) -> Iterator[None]:
        """Attach the cache for the block and take it off again, whatever happens inside."""
        self.attach(pipe, steps, mag_ratios)
        try:
            yield
        finally:
            self.detach(pipe)


_UNET_PAB = "_stepsaver_unet_pab"  # where an attached UNet PAB keeps its timestep pre-hook's handle


def _attach_unet_pab(pipe: Any, skip: int) -> None:
    """PyramidAttentionBroadcast on a UNet, which has no ``enable_cache``.

    diffusers' ``apply_pyramid_attention_broadcast`` hooks the attention modules of any model; it
    needs the current timestep, which an SD-style pipeline does not publish as
    ``pipe.current_timestep``, so a forward pre-hook on the UNet records the ``timestep`` it is
    called with. The same timestep range and callback shape as the Flux setting, so both models'
    PAB rows mean the same thing. :func:`_detach_unet_pab` removes both with diffusers' own
    ``remove_hook(recurse=True)``.
    """
    import diffusers
    from diffusers.hooks import apply_pyramid_attention_broadcast

    unet = unet_of(pipe)
    _detach_unet_pab(pipe)  # attaching twice would stack two hooks
    now: dict[str, Any] = {"t": 1000}

    def record(_module: Any, args: tuple, kwargs: dict) -> None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is not None:
            now["t"] = float(t.flatten()[0]) if hasattr(t, "flatten") else float(t)

    handle = unet.register_forward_pre_hook(record, with_kwargs=True)
    apply_pyramid_attention_broadcast(unet, diffusers.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=skip, spatial_attention_timestep_skip_range=(100, 800),
        current_timestep_callback=lambda: now["t"]))
    pipe.__dict__[_UNET_PAB] = handle


def _detach_unet_pab(pipe: Any) -> bool:
    """Remove a UNet PAB attached by :func:`_attach_unet_pab`; whether there was one."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK

    handle = pipe.__dict__.pop(_UNET_PAB, None)
    if handle is None:
        return False
    handle.remove()
    HookRegistry.check_if_exists_or_initialize(unet_of(pipe)).remove_hook(_PYRAMID_ATTENTION_BROADCAST_HOOK,
                                                                          recurse=True)
    return True


@contextlib.contextmanager
def deepcache_applied(pipe: Any, interval: int) -> Iterator[None]:
    """PyPI ``DeepCache`` (``DeepCacheSDHelper``) on a UNet pipeline for the block, taken off after.

    DeepCache is the UNet-era rival both ``bench skip`` and ``bench caches`` measure; it is not a
    diffusers hook, so it lives here beside the UNet PAB attach rather than in :class:`CacheSpec`.
    Branch 0 (the shallowest skip branch) with the given cache interval, as in its README.
    """
    if unet_of(pipe) is None:
        raise StepsaverError(f"DeepCache needs a UNet pipeline; {type(pipe).__name__} has none")
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise StepsaverError(f"a DeepCache cache interval is an integer >= 1, got {interval!r}")
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.enable()
    try:
        yield
    finally:
        helper.disable()
