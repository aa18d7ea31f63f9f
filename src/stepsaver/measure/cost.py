"""Cost of a generation: MACs, latency, peak memory, and money and CO2 per 10,000 images.

* MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2), counted on real
  calls, so a skipped denoiser call costs nothing and a CFG batch costs double, as on a GPU.
* Latency is a median over repeats after warm-up; on CUDA it is timed with CUDA events so that
  asynchronous kernel launches are not mistaken for finished work.
* Money and CO2 follow from latency: ``seconds / 3600 * price_per_gpu_hour`` and
  ``seconds / 3600 * power_kw * kg_co2_per_kwh``. The defaults are assumptions, shown in every
  report, and configurable: an on-demand H100 hour (USD 2.50), a 700 W board, 0.4 kg/kWh.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class CostModel:
    price_per_gpu_hour: float = 2.50
    power_watts: float = 700.0
    kg_co2_per_kwh: float = 0.4

    def per_10k_images(self, seconds_per_image: float) -> dict[str, float]:
        hours = seconds_per_image * 10_000 / 3600
        return {"usd_per_10k": hours * self.price_per_gpu_hour,
                "kg_co2_per_10k": hours * self.power_watts / 1000 * self.kg_co2_per_kwh,
                **{f"assumed_{k}": v for k, v in asdict(self).items()}}


def count_macs(fn: Callable[[], Any]) -> int:
    """Multiply-accumulates performed by ``fn()`` (FlopCounterMode FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn()
    return counter.get_total_flops() // 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1,
              device: str | torch.device = "cpu") -> dict[str, float]:
    """Median (and min/max) seconds of ``fn()`` after ``warmup`` untimed calls, plus peak memory."""
    dev = torch.device(device)
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        fn()
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(dev)
            times.append(start.elapsed_time(end) / 1000)
        peak = torch.cuda.max_memory_allocated(dev)
    else:
        import resource

        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process high-water mark
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "repeats": repeats, "peak_memory_bytes": int(peak)}
