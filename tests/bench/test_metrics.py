"""Metric arithmetic on synthetic timings, checked against independent computations (statistics module)."""

import random
import statistics

import pytest

from spaceserve.bench.metrics import SLO, RequestRecord, compute_metrics, metric_field_names, ttft_split


def _record(rng: random.Random, index: int, start: float, output_tokens: int | None = None) -> RequestRecord:
    arrival = start + rng.uniform(0.0, 5.0)
    ttft = rng.uniform(0.01, 3.0)
    output_tokens = output_tokens if output_tokens is not None else rng.randint(1, 40)
    times = [arrival + ttft]
    for _ in range(output_tokens - 1):
        times.append(times[-1] + rng.uniform(0.001, 0.2))
    return RequestRecord(
        index=index,
        success=True,
        arrival_time=arrival,
        send_time=arrival + rng.uniform(0.0, 0.01),
        end_time=times[-1] + rng.uniform(0.0, 0.005),
        token_times=tuple(times),
        output_tokens=output_tokens,
        expected_output_tokens=output_tokens,
        prompt_tokens=rng.randint(10, 500),
        encoder_queue_delay=rng.uniform(0.0, 0.5) if rng.random() < 0.7 else None,
    )


def _failed(rng: random.Random, index: int, start: float, message: str) -> RequestRecord:
    arrival = start + rng.uniform(0.0, 5.0)
    return RequestRecord(index, False, arrival, arrival, arrival + rng.uniform(0, 0.1), error=message)


def _quantile(values: list[float], percent: int) -> float:
    if percent == 50:
        return statistics.median(values)
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


@pytest.fixture
def rng() -> random.Random:
    return random.Random()  # fresh timings every run


def test_percentiles_come_from_every_completed_request(rng):
    start = 1000.0
    records = [_record(rng, i, start) for i in range(rng.randint(150, 250))]
    metrics = compute_metrics(records, start)
    ttfts = [(r.token_times[0] - r.arrival_time) * 1e3 for r in records]
    e2els = [(r.end_time - r.arrival_time) * 1e3 for r in records]
    itls = [(b - a) * 1e3 for r in records for a, b in zip(r.token_times, r.token_times[1:])]
    queues = [r.encoder_queue_delay * 1e3 for r in records if r.encoder_queue_delay is not None]
    for name, values in (("ttft", ttfts), ("e2el", e2els), ("itl", itls), ("encoder_queue", queues)):
        assert metrics[f"mean_{name}_ms"] == pytest.approx(statistics.fmean(values))
        for percent in (50, 90, 99):
            assert metrics[f"p{percent}_{name}_ms"] == pytest.approx(_quantile(values, percent)), (name, percent)
    assert metrics["completed"] == len(records) and metrics["failed"] == 0
    assert metrics["total_output_tokens"] == sum(r.output_tokens for r in records)
    assert metrics["total_input_tokens"] == sum(r.prompt_tokens for r in records)
    duration = max(r.end_time for r in records) - start
    assert metrics["duration_s"] == pytest.approx(duration)
    assert metrics["request_throughput"] == pytest.approx(len(records) / duration)
    assert metrics["output_throughput"] == pytest.approx(metrics["total_output_tokens"] / duration)
    assert set(metrics) == set(metric_field_names())


def test_tpot_excludes_the_first_token_and_one_token_outputs(rng):
    start = 0.0
    records = [_record(rng, i, start) for i in range(50)]
    single = [_record(rng, 100 + i, start, output_tokens=1) for i in range(5)]
    metrics = compute_metrics(records + single, start)
    expected = [
        (r.end_time - r.token_times[0]) / (r.output_tokens - 1) * 1e3 for r in records if r.output_tokens > 1
    ]
    assert metrics["mean_tpot_ms"] == pytest.approx(statistics.fmean(expected))
    assert metrics["p99_tpot_ms"] == pytest.approx(_quantile(expected, 99))
    # the one-token requests still count as completed and in TTFT
    assert metrics["completed"] == 55
    all_ttft = [(r.token_times[0] - r.arrival_time) * 1e3 for r in records + single]
    assert metrics["mean_ttft_ms"] == pytest.approx(statistics.fmean(all_ttft))


def test_a_long_first_token_does_not_inflate_tpot(rng):
    gap = rng.uniform(0.005, 0.05)
    ttft = rng.uniform(1.0, 10.0)
    tokens = rng.randint(5, 30)
    times = tuple(ttft + gap * i for i in range(tokens))
    record = RequestRecord(0, True, 0.0, 0.0, times[-1], times, tokens, tokens)
    metrics = compute_metrics([record], 0.0)
    assert metrics["mean_tpot_ms"] == pytest.approx(gap * 1e3)
    assert metrics["mean_ttft_ms"] == pytest.approx(ttft * 1e3)


def test_failed_requests_are_counted_reported_and_excluded_from_latency(rng):
    start = 0.0
    good = [_record(rng, i, start) for i in range(40)]
    bad = [_failed(rng, 100 + i, start, "HTTP 400: image too large") for i in range(3)]
    bad += [_failed(rng, 200 + i, start, "timeout") for i in range(2)]
    metrics = compute_metrics(good + bad, start)
    assert metrics["completed"] == 40 and metrics["failed"] == 5
    assert metrics["errors"] == {"HTTP 400: image too large": 3, "timeout": 2}
    alone = compute_metrics(good, start)
    for name in ("mean_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p90_itl_ms", "p99_e2el_ms"):
        assert metrics[name] == pytest.approx(alone[name])


def test_all_failed_gives_null_latencies():
    rng = random.Random()
    metrics = compute_metrics([_failed(rng, i, 0.0, "boom") for i in range(3)], 0.0)
    assert metrics["completed"] == 0 and metrics["failed"] == 3
    assert metrics["p50_ttft_ms"] is None and metrics["mean_tpot_ms"] is None
    assert metrics["total_output_tokens"] == 0


def test_output_length_mismatches_are_counted(rng):
    record = _record(rng, 0, 0.0, output_tokens=7)
    short = RequestRecord(**{**record.__dict__, "expected_output_tokens": 16})
    assert compute_metrics([record, short], 0.0)["output_len_mismatches"] == 1


def test_goodput_counts_requests_meeting_every_limit(rng):
    start = 0.0
    records = [_record(rng, i, start) for i in range(200)]
    slo = SLO(ttft=rng.uniform(0.5, 2.5), tpot=rng.uniform(0.05, 0.15))

    def meets(r: RequestRecord) -> bool:
        ttft = r.token_times[0] - r.arrival_time
        if ttft > slo.ttft:
            return False
        if r.output_tokens < 2:
            return True
        return (r.end_time - r.token_times[0]) / (r.output_tokens - 1) <= slo.tpot

    good = sum(meets(r) for r in records)
    assert 0 < good < len(records)  # the random limits split the requests
    metrics = compute_metrics(records, start, slo)
    duration = max(r.end_time for r in records) - start
    assert metrics["goodput"] == pytest.approx(good / duration)
    assert metrics["slo_attainment"] == pytest.approx(good / len(records))
    assert compute_metrics(records, start)["goodput"] is None


def test_slo_parsing():
    assert SLO.parse("ttft=2,tpot=0.05") == SLO(ttft=2.0, tpot=0.05)
    assert SLO.parse("e2el=10") == SLO(e2el=10.0)
    for bad in ("ttft", "latency=3", "ttft=fast", "tpot=-1"):
        with pytest.raises(ValueError):
            SLO.parse(bad)


def test_ttft_split_reports_how_long_the_decode_overlapped_encode_and_prefill():
    pipelined = {"video_decode_start_time": 10.0, "video_decode_end_time": 10.4, "encoder_enqueued_time": 10.1,
                 "encoder_end_time": 10.5, "first_scheduled_time": 10.0, "first_token_time": 10.7}
    split = ttft_split(pipelined)
    assert split["ttft_video_decode"] == pytest.approx(0.4) and split["ttft_encode"] == pytest.approx(0.4)
    assert split["ttft_prefill"] == pytest.approx(0.2) and split["ttft_overlap"] == pytest.approx(0.3)
    sequential = pipelined | {"encoder_enqueued_time": 10.45}  # encoding started once decoding had ended
    assert ttft_split(sequential)["ttft_overlap"] == 0.0
    image_only = {k: v for k, v in pipelined.items() if not k.startswith("video")}
    assert ttft_split(image_only)["ttft_overlap"] is None


def test_ttft_from_send_leaves_out_client_side_queueing(rng):
    """Under --max-concurrency a request waits in the client before it is sent: TTFT counts that wait (from the
    scheduled arrival), ttft_send does not (guidellm's definition)."""
    records = []
    for index in range(50):
        arrival = rng.uniform(0, 5)
        queued = rng.uniform(0.2, 1.0)
        server_ttft = rng.uniform(0.01, 0.05)
        first = arrival + queued + server_ttft
        times = (first, first + 0.01, first + 0.02)
        records.append(RequestRecord(index, True, arrival, arrival + queued, times[-1], times, 3, 3))
    metrics = compute_metrics(records, 0.0)
    assert metrics["p50_ttft_send_ms"] == pytest.approx(_quantile([r.ttft_from_send for r in records], 50) * 1e3)
    assert 10 <= metrics["p50_ttft_send_ms"] <= 50 and metrics["p50_ttft_ms"] >= 200
