"""Every Prometheus metric, declared once; labels come from small closed sets, never UIDs.

Under gunicorn, PROMETHEUS_MULTIPROC_DIR (set by `gateway up`) makes the workers share counters."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUESTS = Counter("gateway_requests_total", "HTTP requests answered", ["endpoint", "method", "status"])
REQUEST_SECONDS = Histogram(
    "gateway_request_seconds",
    "Time to answer a request (to the first byte of streamed bodies)",
    ["endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
STORED_INSTANCES = Counter("gateway_stow_instances_total", "STOW-RS parts by outcome", ["outcome"])
STORED_BYTES = Counter("gateway_stow_bytes_total", "Bytes of instances stored")
DERIVE_SECONDS = Histogram(
    "gateway_derive_seconds",
    "Time to derive every version of one instance",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
DERIVE_JOBS = Counter(
    "gateway_derive_jobs_total",
    "Derive job outcomes: done, retry (a fault, RQ tries again), failed (for good)",
    ["outcome"],
)


def exposition() -> tuple[bytes, str]:
    """The text exposition, aggregated across gunicorn workers when running multi-process."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
