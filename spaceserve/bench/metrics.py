"""What one request measured (RequestRecord) and the run's metrics computed from all of them.

Definitions (every time is client-side, from the request's scheduled arrival):
- TTFT: arrival -> the first output carrying a token. Under --max-concurrency (or a client that lags) a request
  may be sent after its arrival; `ttft_send` measures from the send instead (what guidellm calls TTFT), so the two
  differ by the client-side queueing.
- TPOT: (e2e - TTFT) / (output tokens - 1) per request; undefined for one-token outputs, which are left out.
- ITL: gaps between consecutive token-bearing outputs, over all requests.
- e2e latency: arrival -> the response is complete.
- TTFT split (in-process only, from the engine's per-request timestamps; null over HTTP): video decode = the decode
  stage's start -> end for the request's videos; encode = the request's first encoder enqueue -> the end of the
  encoder batch holding its last item (queueing + encoding); prefill = that end (or, with nothing to encode, the
  first scheduling) -> the first token. Text before a video may be prefilled while it is still decoding or encoding,
  so the parts need not add up to TTFT. Overlap = how long the video decode ran while the request's encode and
  prefill did (decode start -> end intersected with encode start -> first token): a video is encoded and prefilled
  chunk by chunk as it decodes, so decode + encode + prefill - overlap is about TTFT. The encode starts when the
  request's first item can be encoded (for a video: its first chunk is decoded).
- Percentiles are over every completed request of the measured run; warm-ups never reach this module; failed
  requests are counted and reported, and contribute no latency.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

TTFT_PARTS = ("ttft_video_decode", "ttft_encode", "ttft_prefill")
TTFT_OVERLAP = "ttft_overlap"
LATENCY_METRICS = ("ttft", "ttft_send", "tpot", "itl", "e2el", "encoder_queue", *TTFT_PARTS, TTFT_OVERLAP)
STATISTICS = ("mean", "p50", "p90", "p99")


@dataclass(frozen=True)
class RequestRecord:
    index: int
    success: bool
    arrival_time: float  # the scheduled send time
    send_time: float  # when the backend actually started it (later under --max-concurrency or a lagging client)
    end_time: float  # response complete, or the failure seen
    token_times: tuple[float, ...] = ()  # when each token-bearing output arrived
    output_tokens: int = 0
    expected_output_tokens: int = 0
    prompt_tokens: int | None = None
    encoder_queue_delay: float | None = None  # seconds an image waited for the encoder; None over HTTP
    error: str | None = None
    ttft_video_decode: float | None = None  # the TTFT split in seconds (module docstring); None over HTTP
    ttft_encode: float | None = None
    ttft_prefill: float | None = None
    ttft_overlap: float | None = None

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival_time

    @property
    def ttft_from_send(self) -> float:
        return self.token_times[0] - self.send_time

    @property
    def e2e_latency(self) -> float:
        return self.end_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2e_latency - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


@dataclass(frozen=True)
class SLO:
    """Latency limits in seconds; a request meets the SLO when it meets every limit given."""

    ttft: float | None = None
    tpot: float | None = None
    e2el: float | None = None

    @classmethod
    def parse(cls, text: str) -> SLO:
        """`"ttft=2,tpot=0.05"` (seconds)."""
        limits: dict[str, float] = {}
        for item in text.split(","):
            name, sep, value = item.strip().partition("=")
            if not sep or name not in ("ttft", "tpot", "e2el"):
                raise ValueError(f"expected SLO limits like ttft=2,tpot=0.05 (names ttft, tpot, e2el), got {text!r}")
            try:
                limits[name] = float(value)
            except ValueError:
                raise ValueError(f"SLO limit {name} must be a number of seconds, got {value!r}") from None
            if not limits[name] > 0:
                raise ValueError(f"SLO limit {name} must be > 0 seconds, got {value!r}")
        return cls(**limits)

    def met_by(self, record: RequestRecord) -> bool:
        if self.ttft is not None and record.ttft > self.ttft:
            return False
        # a one-token output has no TPOT and so cannot break a TPOT limit
        tpot = record.tpot
        if self.tpot is not None and tpot is not None and tpot > self.tpot:
            return False
        return self.e2el is None or record.e2e_latency <= self.e2el

    def as_dict(self) -> dict[str, float | None]:
        return {"ttft_s": self.ttft, "tpot_s": self.tpot, "e2el_s": self.e2el}

    @classmethod
    def from_dict(cls, values: dict[str, float | None]) -> SLO:
        """The inverse of as_dict (a result row's "slo")."""
        return cls(ttft=values.get("ttft_s"), tpot=values.get("tpot_s"), e2el=values.get("e2el_s"))

    def label(self) -> str:
        """e.g. "ttft<=2s,tpot<=25ms"."""
        parts = [f"{name}<={_seconds_label(value)}" for name, value in
                 (("ttft", self.ttft), ("tpot", self.tpot), ("e2el", self.e2el)) if value is not None]
        return ",".join(parts) or "none"


def _seconds_label(seconds: float) -> str:
    return f"{seconds:g}s" if seconds >= 1 else f"{seconds * 1e3:g}ms"


def metric_field_names() -> list[str]:
    """The metric keys every result row carries (values may be null)."""
    names = [
        "completed",
        "failed",
        "duration_s",
        "total_input_tokens",
        "total_output_tokens",
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
        "goodput",
        "slo_attainment",
        "output_len_mismatches",
        "max_send_lag_ms",
        "errors",
    ]
    names += [f"{stat}_{name}_ms" for name in LATENCY_METRICS for stat in STATISTICS]
    return names


def compute_metrics(records: Sequence[RequestRecord], start_time: float, slo: SLO | None = None) -> dict[str, Any]:
    """The run's metrics; `start_time` is when the run began (the first arrival was scheduled at or after it)."""
    completed = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    end_time = max((r.end_time for r in records), default=start_time)
    duration = end_time - start_time
    input_tokens = [r.prompt_tokens for r in completed if r.prompt_tokens is not None]
    output_tokens = sum(r.output_tokens for r in completed)
    met = [r for r in completed if slo.met_by(r)] if slo is not None else None

    metrics: dict[str, Any] = {
        "completed": len(completed),
        "failed": len(failed),
        "duration_s": duration,
        "total_input_tokens": sum(input_tokens) if len(input_tokens) == len(completed) else None,
        "total_output_tokens": output_tokens,
        "request_throughput": _per_second(len(completed), duration),
        "output_throughput": _per_second(output_tokens, duration),
        "total_token_throughput": (
            _per_second(output_tokens + sum(input_tokens), duration) if len(input_tokens) == len(completed) else None
        ),
        "goodput": None if met is None else _per_second(len(met), duration),
        "slo_attainment": None if met is None or not completed else len(met) / len(completed),
        "output_len_mismatches": sum(r.output_tokens != r.expected_output_tokens for r in completed),
        "max_send_lag_ms": max(((r.send_time - r.arrival_time) * 1e3 for r in records), default=None),
        "errors": _error_counts(failed),
    }
    samples = {
        "ttft": [r.ttft for r in completed],
        "ttft_send": [r.ttft_from_send for r in completed],
        "tpot": [t for t in (r.tpot for r in completed) if t is not None],
        "itl": [gap for r in completed for gap in r.itls],
        "e2el": [r.e2e_latency for r in completed],
        "encoder_queue": [r.encoder_queue_delay for r in completed if r.encoder_queue_delay is not None],
    }
    for part in (*TTFT_PARTS, TTFT_OVERLAP):
        samples[part] = [getattr(r, part) for r in completed if getattr(r, part) is not None]
    for name, values in samples.items():
        metrics.update(_statistics_ms(name, values))
    return metrics


def ttft_split(metrics: dict[str, float]) -> dict[str, float | None]:
    """The TTFT parts (seconds) of one request from its RequestOutput.metrics timestamps (module docstring)."""

    def span(start: str, end: str) -> float | None:
        if metrics.get(start) is None or metrics.get(end) is None:
            return None
        return metrics[end] - metrics[start]

    prefill_from = "encoder_end_time" if metrics.get("encoder_end_time") is not None else "first_scheduled_time"
    decode = ("video_decode_start_time", "video_decode_end_time")
    encode_to_token = ("encoder_enqueued_time", "first_token_time")
    overlap = None
    if all(metrics.get(key) is not None for key in decode + encode_to_token):
        start = max(metrics[decode[0]], metrics[encode_to_token[0]])
        overlap = max(0.0, min(metrics[decode[1]], metrics[encode_to_token[1]]) - start)
    return {
        "ttft_video_decode": span(*decode),
        "ttft_encode": span("encoder_enqueued_time", "encoder_end_time"),
        "ttft_prefill": span(prefill_from, "first_token_time"),
        TTFT_OVERLAP: overlap,
    }


def _statistics_ms(name: str, seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return {f"{stat}_{name}_ms": None for stat in STATISTICS}
    values = np.asarray(seconds, dtype=np.float64) * 1e3
    return {
        f"mean_{name}_ms": float(values.mean()),
        f"p50_{name}_ms": float(np.percentile(values, 50)),
        f"p90_{name}_ms": float(np.percentile(values, 90)),
        f"p99_{name}_ms": float(np.percentile(values, 99)),
    }


def _per_second(count: float, duration: float) -> float | None:
    return count / duration if duration > 0 and math.isfinite(duration) else None


def _error_counts(failed: Sequence[RequestRecord]) -> dict[str, int]:
    """How often each distinct error message occurred, most frequent first."""
    counts: dict[str, int] = {}
    for record in failed:
        message = record.error or "unknown error"
        counts[message] = counts.get(message, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))
