"""The sweep driver with a scripted backend: what is counted, what each target is sent, how failures surface."""

import asyncio
import random
import time

import pytest

from spaceserve.bench.metrics import RequestRecord
from spaceserve.bench.report import row_fields
from spaceserve.bench.runner import SweepConfig, Target, WorkloadSet, run_requests, run_sweep
from spaceserve.bench.workloads import IntRange, PromptTextMaker, WorkloadOptions


class ScriptedBackend:
    """Answers each request with `output_len` tokens after a few event-loop turns; fails the indices it is told to."""

    name = "scripted"

    def __init__(self, failing: set[int] = frozenset()) -> None:
        self.failing = failing
        self.sent: list[tuple[str, object]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.closed = False

    def prepare(self, spec):
        return spec

    async def send(self, spec, request_id, arrival_time):
        self.sent.append((request_id, spec))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        send_time = time.perf_counter()
        times = []
        for _ in range(spec.output_len):
            await asyncio.sleep(0)
            times.append(time.perf_counter())
        self.in_flight -= 1
        if spec.index in self.failing and not request_id.startswith("warmup"):
            return RequestRecord(spec.index, False, arrival_time, send_time, times[-1], error="scripted failure")
        return RequestRecord(
            spec.index, True, arrival_time, send_time, times[-1], tuple(times), spec.output_len, spec.output_len, 11
        )

    async def engine_counters(self):
        return {"num_preemptions": len(self.sent)}

    async def close(self):
        self.closed = True


def _config(**overrides) -> SweepConfig:
    options = WorkloadOptions(
        num_requests=10,
        seed=random.randrange(1 << 30),
        image_sizes=((28, 28), (56, 42)),
        prompt_len=IntRange(3, 9),
        output_len=IntRange(2, 6),
    )
    values = {"workload": "image-mix", "options": options, "rates": (200.0, float("inf")), "show_progress": False}
    values.update(overrides)
    return SweepConfig(**values)


def _target(mode: str, backend) -> Target:
    async def open_backend():
        return backend, {"device": "test-device"}

    return Target(mode, "fcfs", open_backend)


def _sweep(config, targets):
    rows = []
    result = asyncio.run(
        run_sweep(config, targets, WorkloadSet(config, PromptTextMaker(None)), {"model": "m"}, rows.append)
    )
    assert result == rows
    return rows


def test_warmups_are_sent_first_and_not_counted():
    config = _config(num_warmups=3, rates=(float("inf"),))
    backend = ScriptedBackend()
    (row,) = _sweep(config, [_target("time", backend)])
    ids = [request_id for request_id, _ in backend.sent]
    assert len(ids) == 13 and all(i.startswith("warmup") for i in ids[:3])
    assert not any(i.startswith("warmup") for i in ids[3:])
    assert row["completed"] == 10 and row["num_warmups"] == 3 and row["warmup_failed"] == 0
    assert row["engine_counters"] == {"num_preemptions": 10}  # counted over the measured run only
    measured = [spec for _, spec in backend.sent[3:]]
    assert row["total_output_tokens"] == sum(spec.output_len for spec in measured)
    warm_prompts = {spec.prompt_text for _, spec in backend.sent[:3]}
    assert not warm_prompts & {spec.prompt_text for spec in measured}
    assert backend.closed


def test_failures_are_counted_and_listed():
    failing = set(random.sample(range(10), 3))
    (row, _) = _sweep(_config(), [_target("time", ScriptedBackend(failing))])
    assert row["status"] == "ok" and row["completed"] == 7 and row["failed"] == 3
    assert row["errors"] == {"scripted failure": 3}


def test_every_target_gets_the_same_requests_and_rate_points_differ():
    first, second = ScriptedBackend(), ScriptedBackend()
    rows = _sweep(_config(), [_target("time", first), _target("streams", second)])
    assert [(r["multiplex"], r["request_rate"]) for r in rows] == [
        ("time", 200.0), ("time", "inf"), ("streams", 200.0), ("streams", "inf")
    ]
    assert [spec for _, spec in first.sent] == [spec for _, spec in second.sent]
    rate_a = {spec.prompt_text for _, spec in first.sent[:10]}
    rate_b = {spec.prompt_text for _, spec in first.sent[10:]}
    assert not rate_a & rate_b
    assert all(set(row) == set(row_fields()) for row in rows)


def test_a_target_that_cannot_start_fails_its_rows_and_the_sweep_goes_on():
    async def refuse():
        raise ValueError("multiplex mode 'space' is not available")

    backend = ScriptedBackend()
    rows = _sweep(_config(), [Target("space", "fcfs", refuse), _target("time", backend)])
    assert [r["status"] for r in rows] == ["failed", "failed", "ok", "ok"]
    assert rows[0]["error"] == "ValueError: multiplex mode 'space' is not available"
    assert rows[0]["completed"] is None and set(rows[0]) == set(row_fields())
    assert rows[2]["completed"] == 10


def test_max_concurrency_bounds_requests_in_flight():
    config = _config()
    specs, _ = WorkloadSet(config, PromptTextMaker(None)).rate_point(0)
    limit = random.randint(1, 4)
    backend = ScriptedBackend()
    records, _ = asyncio.run(run_requests(backend, specs, [0.0] * len(specs), "bench", max_concurrency=limit))
    assert backend.max_in_flight == limit and len(records) == len(specs)
    unbounded = ScriptedBackend()
    asyncio.run(run_requests(unbounded, specs, [0.0] * len(specs), "bench"))
    assert unbounded.max_in_flight == len(specs)


def test_requests_wait_for_their_arrival():
    config = _config()
    specs, _ = WorkloadSet(config, PromptTextMaker(None)).rate_point(0)
    offsets = sorted(random.uniform(0.0, 0.05) for _ in specs)
    records, start = asyncio.run(run_requests(ScriptedBackend(), specs, offsets, "bench"))
    for record, offset in zip(records, offsets):
        assert record.arrival_time == pytest.approx(start + offset)
        assert record.send_time >= record.arrival_time - 1e-3  # asyncio may wake within its clock resolution
