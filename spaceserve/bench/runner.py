"""Drive a sweep: for each target (an execution mode's engine, or a server), warm up, then run each rate point.

Each rate point sends its own seeded requests (the same bytes for every target, but different from the other rate
points, so no run is served from the prefix or encoder cache left by the previous one). Arrivals are scheduled
from the run's start; a request's latencies count from its scheduled arrival, so client-side waiting (e.g. under
--max-concurrency) is charged to the system under test rather than hidden.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from tqdm import tqdm

from spaceserve.bench.arrivals import arrival_offsets
from spaceserve.bench.backends import Backend
from spaceserve.bench.metrics import SLO, RequestRecord, compute_metrics
from spaceserve.bench.report import make_row
from spaceserve.bench.workloads import PromptTextMaker, RequestSpec, WorkloadOptions, build_workload

_WARMUP_STREAM, _RATE_STREAM = 1, 0


@dataclass(frozen=True)
class SweepConfig:
    workload: str
    options: WorkloadOptions  # num_requests is the measured requests per rate point; seed the base seed
    rates: tuple[float, ...]
    burstiness: float = 1.0
    num_warmups: int = 0
    max_concurrency: int | None = None
    slos: tuple[SLO, ...] = ()
    """Each run is scored against every SLO: one row per (target, rate, SLO) from the same requests."""
    show_progress: bool = True


@dataclass(frozen=True)
class Target:
    """One system to measure. `open` starts it (e.g. builds the engine) and returns the backend plus the run fields
    it knows (device, engine_settings); raising fails every rate point of this target with the message."""

    multiplex: str
    encoder_policy: str
    open: Callable[[], Awaitable[tuple[Backend, dict[str, Any]]]]


def derived_seed(seed: int, stream: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(1)[0])


class WorkloadSet:
    """The requests and arrival schedule of every rate point and of the warm-up, built once and shared by targets."""

    def __init__(self, config: SweepConfig, text_maker: PromptTextMaker) -> None:
        self.config = config
        self.text_maker = text_maker
        self._specs: dict[tuple[int, int], list[RequestSpec]] = {}

    def rate_point(self, rate_index: int) -> tuple[list[RequestSpec], list[float]]:
        seed = derived_seed(self.config.options.seed, _RATE_STREAM, rate_index)
        specs = self._build(_RATE_STREAM, rate_index, self.config.options.num_requests)
        rate = self.config.rates[rate_index]
        return specs, arrival_offsets(len(specs), rate, self.config.burstiness, seed)

    def warmup(self) -> list[RequestSpec]:
        return self._build(_WARMUP_STREAM, 0, self.config.num_warmups)

    def _build(self, stream: int, index: int, count: int) -> list[RequestSpec]:
        key = (stream, index)
        if key not in self._specs:
            seed = derived_seed(self.config.options.seed, stream, index)
            options = replace(self.config.options, num_requests=count, seed=seed)
            self._specs[key] = build_workload(self.config.workload, options, self.text_maker)
        return self._specs[key]


async def run_requests(
    backend: Backend,
    specs: Sequence[RequestSpec],
    offsets: Sequence[float],
    id_prefix: str,
    max_concurrency: int | None = None,
    progress: tqdm | None = None,
) -> tuple[list[RequestRecord], float]:
    """Send every request at its offset from now; returns the records (in spec order) and the start time."""
    prepared = [backend.prepare(spec) for spec in specs]
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    start = time.perf_counter()

    async def send(position: int) -> RequestRecord:
        arrival = start + offsets[position]
        delay = arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        request_id = f"{id_prefix}-{specs[position].index}"
        if semaphore is None:
            record = await backend.send(prepared[position], request_id, arrival)
        else:
            async with semaphore:
                record = await backend.send(prepared[position], request_id, arrival)
        if progress is not None:
            progress.update(1)
        return record

    records = await asyncio.gather(*(send(position) for position in range(len(specs))))
    return list(records), start


async def run_sweep(
    config: SweepConfig,
    targets: Sequence[Target],
    workloads: WorkloadSet,
    run_fields: dict[str, Any],
    on_row: Callable[[dict[str, Any]], None],
) -> list[dict[str, Any]]:
    """Every target at every rate; one row per (target, rate, SLO), also handed to `on_row` as soon as it exists.
    The rows of one run differ only in their SLO and what depends on it (goodput, attainment)."""
    rows = []
    slos: tuple[SLO | None, ...] = config.slos or (None,)

    def emit(fields: dict[str, Any], run: tuple[list[RequestRecord], float] | None, error: str | None) -> None:
        for slo in slos:
            metrics = None if run is None else compute_metrics(run[0], run[1], slo)
            row = make_row({**fields, "slo": None if slo is None else slo.as_dict()}, metrics, error)
            rows.append(row)
            on_row(row)

    for target in targets:
        fields = {
            **run_fields,
            "multiplex": target.multiplex,
            "encoder_policy": target.encoder_policy,
            "burstiness": config.burstiness,
            "num_prompts": config.options.num_requests,
            "num_warmups": config.num_warmups,
            "max_concurrency": config.max_concurrency,
        }
        try:
            backend, known = await target.open()
        except Exception as exc:  # a mode this build cannot run fails its rows, not the sweep
            for rate in config.rates:
                emit({**fields, "request_rate": rate}, None, f"{type(exc).__name__}: {exc}")
            continue
        fields.update(known)
        try:
            warmup = workloads.warmup()
            warm_records, _ = await run_requests(
                backend, warmup, [0.0] * len(warmup), f"warmup-{target.multiplex}-{target.encoder_policy}"
            )
            fields["warmup_failed"] = sum(not r.success for r in warm_records)
            for rate_index, rate in enumerate(config.rates):
                point = {**fields, "request_rate": rate}
                try:
                    before = await backend.engine_counters()
                    run = await _run_rate_point(config, backend, workloads, target, rate_index)
                    after = await backend.engine_counters()
                except Exception as exc:
                    emit(point, None, f"{type(exc).__name__}: {exc}")
                else:
                    counters = None if before is None or after is None else {k: after[k] - before[k] for k in after}
                    emit({**point, "engine_counters": counters}, run, None)
        finally:
            await backend.close()
    return rows


async def _run_rate_point(
    config: SweepConfig, backend: Backend, workloads: WorkloadSet, target: Target, rate_index: int
) -> tuple[list[RequestRecord], float]:
    specs, offsets = workloads.rate_point(rate_index)
    rate = config.rates[rate_index]
    description = f"{target.multiplex}/{target.encoder_policy} rate={rate:g}"
    with tqdm(total=len(specs), desc=description, disable=not config.show_progress, leave=False) as progress:
        records, start = await run_requests(
            backend,
            specs,
            offsets,
            f"bench-{target.multiplex}-{target.encoder_policy}-{rate_index}",
            config.max_concurrency,
            progress,
        )
    return records, start
