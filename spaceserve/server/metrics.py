"""Prometheus metrics, named as vLLM names them (with the `spaceserve:` prefix).

Latency histograms come from each finished request's RequestOutput.metrics timestamps (time.monotonic), recorded
on the engine thread through AsyncLLM's stat-logger hook. Gauges are read at scrape time from the engine's stats
snapshot, so a scrape never touches engine state. Each app has its own registry, so several servers can live in
one process (tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from spaceserve.core.outputs import RequestOutput
from spaceserve.engine.data_parallel.router import REASONS
from spaceserve.engine.stats import EngineStats

# seconds; dense where interactive serving lives, sparse out to the long tail
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0)
TPOT_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    """A StatLogger for AsyncLLM plus the registry /metrics renders."""

    def __init__(
        self,
        model_name: str,
        stats: Callable[[], EngineStats],
        router_stats: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        """router_stats: AsyncLLM.router_stats (data parallelism: the router's decisions and replica loads)."""
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.model_name = model_name

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"spaceserve:{name}", doc, labels, buckets=buckets, registry=self.registry).labels(
                model_name
            )

        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Arrival to first generated token.", TTFT_BUCKETS
        )
        self.time_per_output_token = histogram(
            "time_per_output_token_seconds",
            "Mean time between a request's output tokens after the first (one observation per request).",
            TPOT_BUCKETS,
        )
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Arrival to the last token of requests that finished.", REQUEST_BUCKETS
        )
        self.request_queue_time = histogram(
            "request_queue_time_seconds", "Arrival to first scheduled by the LM scheduler.", REQUEST_BUCKETS
        )
        self.encoder_queue_time = histogram(
            "encoder_queue_time_seconds",
            "A request's first image: queued for the encoder to scheduled on it.",
            REQUEST_BUCKETS,
        )
        self.prompt_tokens = Counter(
            "spaceserve:prompt_tokens", "Prompt tokens (images expanded) of finished requests.", labels,
            registry=self.registry,
        ).labels(model_name)
        self.generation_tokens = Counter(
            "spaceserve:generation_tokens", "Generated tokens of finished requests.", labels, registry=self.registry
        ).labels(model_name)
        self.request_success = Counter(
            "spaceserve:request_success", "Requests that finished, by finish reason.", labels + ["finished_reason"],
            registry=self.registry,
        )
        self.registry.register(_EngineStatsCollector(model_name, stats))
        if router_stats is not None and router_stats() is not None:
            self.registry.register(_RouterCollector(model_name, router_stats))

    def record_finished(self, output: RequestOutput) -> None:
        times = output.metrics
        arrival = times.get("arrival_time")
        if arrival is None:
            return
        if "first_scheduled_time" in times:
            self.request_queue_time.observe(times["first_scheduled_time"] - arrival)
        if "encoder_enqueued_time" in times and "encoder_scheduled_time" in times:
            self.encoder_queue_time.observe(times["encoder_scheduled_time"] - times["encoder_enqueued_time"])
        if "first_token_time" in times:
            self.time_to_first_token.observe(times["first_token_time"] - arrival)
        completion = output.outputs[0]
        reason = completion.finish_reason
        if reason not in ("stop", "length"):
            return  # aborted or failed: no latency to speak of
        num_tokens = len(completion.token_ids)
        self.request_success.labels(self.model_name, reason).inc()
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        self.generation_tokens.inc(num_tokens)
        if "finished_time" in times:
            self.e2e_request_latency.observe(times["finished_time"] - arrival)
            if num_tokens > 1 and "first_token_time" in times:
                self.time_per_output_token.observe((times["finished_time"] - times["first_token_time"]) / (num_tokens - 1))


class _EngineStatsCollector(Collector):
    def __init__(
        self,
        model_name: str,
        stats: Callable[[], EngineStats],
        router_stats: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        """router_stats: AsyncLLM.router_stats (data parallelism: the router's decisions and replica loads)."""
        self.model_name = model_name
        self.stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self.stats()
        gauges = [
            ("num_requests_running", "Requests in the LM scheduler's running batch.", stats.num_running),
            ("num_requests_waiting", "Requests waiting for the LM scheduler.", stats.num_waiting),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", stats.kv_cache_usage),
            ("num_kv_cache_free_blocks", "KV-cache blocks free.", stats.num_free_kv_blocks),
            ("encoder_cache_usage_perc", "Fraction of encoder-cache rows held (1 = full).", stats.encoder_cache_usage),
            ("encoder_queue_length", "Images waiting in the encoder queue.", stats.num_encoder_queued_items),
        ]
        for name, doc, value in gauges:
            family = GaugeMetricFamily(f"spaceserve:{name}", doc, labels=["model_name"])
            family.add_metric([self.model_name], float(value))
            yield family
        counters = [
            ("num_preemptions", "Requests preempted (KV blocks ran out).", stats.num_preemptions),
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits),
        ]
        for name, doc, value in counters:
            family = CounterMetricFamily(f"spaceserve:{name}", doc, labels=["model_name"])
            family.add_metric([self.model_name], float(value))
            yield family
        yield from _allocator_families(self.model_name, stats.allocator)


def _allocator_families(model_name: str, samples) -> Iterator[CounterMetricFamily]:
    """space: the SM allocator's decisions and its predicted against measured times, one family per name."""
    families: dict[str, CounterMetricFamily] = {}
    for name, labels, value in samples:
        keys = sorted(labels)
        family = families.get(name)
        if family is None:
            doc = "The SM allocator's decisions and its predictions against measured times (space)."
            family = families[name] = CounterMetricFamily(name.removesuffix("_total"), doc, labels=["model_name", *keys])
        family.add_metric([model_name, *(labels[k] for k in keys)], float(value))
    yield from families.values()


class _RouterCollector(Collector):
    """Data parallelism: where the router sent requests and why, and each replica's state."""

    def __init__(self, model_name: str, router_stats: Callable[[], dict[str, Any] | None]) -> None:
        self.model_name = model_name
        self.router_stats = router_stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self.router_stats()
        if stats is None:
            return
        decisions = CounterMetricFamily(
            "spaceserve:router_decisions",
            "Requests routed to a data-parallel replica, by reason (image_affinity, prefix_affinity: the replica held "
            "the request's images or prefix; least_loaded; affinity_overloaded: the holder was too loaded; "
            "round_robin; retry: re-sent after its replica failed).",
            labels=["model_name", "reason"],
        )
        for reason in REASONS:
            decisions.add_metric([self.model_name, reason], float(stats["decisions"].get(reason, 0)))
        yield decisions
        replicas = stats["replicas"]
        alive = GaugeMetricFamily(
            "spaceserve:data_parallel_replicas_alive", "Data-parallel replicas serving.", labels=["model_name"]
        )
        alive.add_metric([self.model_name], float(sum(replica["alive"] for replica in replicas)))
        yield alive
        per_replica = [
            ("router_requests_in_flight", "Requests in flight on each data-parallel replica.", "requests"),
            ("router_outstanding_tokens", "Prompt tokens to compute and tokens to generate on each replica, as the "
             "router estimates them.", "outstanding_tokens"),
        ]
        for name, doc, key in per_replica:
            family = GaugeMetricFamily(f"spaceserve:{name}", doc, labels=["model_name", "replica"])
            for index, replica in enumerate(replicas):
                family.add_metric([self.model_name, str(index)], float(replica[key]))
            yield family
