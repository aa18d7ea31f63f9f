"""Prometheus metrics of one app instance (own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("stepsaver_requests_total",
                                "HTTP requests by route and status code (499: the client left)",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("stepsaver_request_seconds", "HTTP request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.denoiser_calls = Counter("stepsaver_denoiser_calls_total",
                                      "Denoiser calls per image: made, or saved by Skip", ["kind"],
                                      registry=self.registry)
        self.steps_saved = Counter("stepsaver_steps_saved_total",
                                   "Steps saved by Predict (recommended steps vs 50)", registry=self.registry)
        self.queue_depth = Gauge("stepsaver_queue_depth", "Generate jobs accepted and not yet running (all of them)",
                                 registry=self.registry)
        self.queue_size = Gauge("stepsaver_queue_size", "Most generate jobs that may wait; one more is a 503",
                                registry=self.registry)
        self.abandoned = Counter("stepsaver_abandoned_total",
                                 "Generate jobs given up by their request: reason timeout (504) or disconnect (499); "
                                 "stage queued (never ran), running (stopped once its batch had no client) or done",
                                 ["reason", "stage"], registry=self.registry)
        self.batch_size = Histogram("stepsaver_generate_batch_size", "Prompts per pipeline call",
                                    buckets=(1, 2, 4, 8, 16, 32), registry=self.registry)
        self.rejected = Counter("stepsaver_rejected_total", "Generate requests refused with 503 (queue full)",
                                registry=self.registry)
