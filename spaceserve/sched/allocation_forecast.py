"""What the allocator predicts for one candidate plan, for many plans at once (numpy arrays over plans x requests).

The model is a fluid one, re-evaluated at every decision (a receding horizon: each plan is judged as if held until
the backlog is served, and the next decision may change it):

- The encoder serves its queue in the scheduler's order, batch after batch, each batch taking the encoder curve's
  time on the plan's encoder SMs; a request's images are ready when the batch holding its last one ends.
- The LM serves prefill tokens at a rate that changes at most twice: paused (rate ~0) while a whole-device encoder
  batch runs, then the rate of its side of the split while the encoder still has work, then the rate it gets once
  the encoder queue has drained. A request is prefilled once its images are ready, in the order they become ready
  (the LM scheduler admits whatever is ready); its TTFT is when its last prefill token is done minus its arrival.
- Running decodes are delayed, relative to decoding alone on the whole GPU, in two ways: by (1 - alone/gap) of the
  time spent on a side whose decode-only step is slower than the whole GPU's (all of it while paused), and by
  (1 - decode-only/mixed) of the time the LM spends on steps that also carry a prefill chunk (the prefill server's
  busy time in each phase). Only decodes that would still be running count (their remaining tokens).

The FCFS-by-readiness prefill queue is one work-conserving server: finish_n = max over k <= n of (ready_k + work of
k..n), computed with a cumulative maximum in "work time" (the integral of the rate), so no loop runs per request.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAUSED_RATE = 1e-9
"""Prefill tokens per ms while the LM is paused or starved (zero would make the work clock non-invertible)."""


@dataclass(frozen=True)
class Backlog:
    """The queued requests, as arrays over N requests (the forecast's columns)."""

    age_ms: np.ndarray
    """now - arrival, per request."""
    prefill_tokens: np.ndarray
    ready_batch: np.ndarray
    """Index of the queued encoder batch holding the request's last image; -1 when none of its images is queued."""
    in_flight: np.ndarray
    """True when some image of the request is in the encoder batch in flight."""

    @property
    def size(self) -> int:
        return int(self.age_ms.size)


@dataclass(frozen=True)
class Phases:
    """Per plan (arrays over O plans): the LM's prefill rate (tokens/ms) and decode step gap (ms) in each phase.
    Phase A is [0, pause_end), phase B [pause_end, drain), phase C [drain, inf)."""

    pause_end_ms: np.ndarray
    drain_ms: np.ndarray
    rate_b: np.ndarray
    rate_c: np.ndarray
    gap_b: np.ndarray
    """Step time of a decode step carrying a prefill chunk, in phase B (C below)."""
    gap_c: np.ndarray
    decode_gap_b: np.ndarray
    """Step time of a decode-only step in phase B (C below)."""
    decode_gap_c: np.ndarray


@dataclass(frozen=True)
class Forecast:
    ttft_ms: np.ndarray
    """[O, N] predicted TTFT per plan and request."""
    prefill_done_ms: np.ndarray
    """[O] when the last queued request's prefill is done (from now)."""
    decode_delay_ms: np.ndarray
    """[O] summed over running decodes: how much later their tokens come than decoding alone would give."""


def ready_times(batch_end_ms: np.ndarray, in_flight_end_ms: np.ndarray, backlog: Backlog) -> np.ndarray:
    """[O, N] when each request's images are all embedded, from the batch end times [O, K] of each plan."""
    plans = batch_end_ms.shape[0]
    ready = np.zeros((plans, backlog.size))
    queued = backlog.ready_batch >= 0
    if queued.any():
        ready[:, queued] = batch_end_ms[:, backlog.ready_batch[queued]]
    if backlog.in_flight.any():
        ready[:, backlog.in_flight] = np.maximum(ready[:, backlog.in_flight], in_flight_end_ms[:, None])
    return ready


def forecast(ready_ms: np.ndarray, backlog: Backlog, phases: Phases, decode_lifetimes_ms: np.ndarray,
             alone_gap_ms: float) -> Forecast:
    plans = ready_ms.shape[0]
    if backlog.size == 0:
        done, idle = np.zeros(plans), np.zeros((plans, 2))
        delay = _decode_delay(phases, done, idle, decode_lifetimes_ms, alone_gap_ms)
        return Forecast(np.zeros((plans, 0)), done, delay)
    order = np.argsort(ready_ms, axis=1, kind="stable")
    ready_sorted = np.take_along_axis(ready_ms, order, axis=1)
    work = backlog.prefill_tokens[order].astype(np.float64)
    done_work = np.cumsum(work, axis=1)
    finish_work = np.maximum.accumulate(_work_clock(ready_sorted, phases) - (done_work - work), axis=1) + done_work
    finish_sorted = _inverse_work_clock(finish_work, phases)
    finish = np.empty_like(finish_sorted)
    np.put_along_axis(finish, order, finish_sorted, axis=1)
    done = finish.max(axis=1)
    ttft = finish + backlog.age_ms[None, :]
    busy = _busy_time(finish_work - work, finish_work, phases)
    return Forecast(ttft, done, _decode_delay(phases, done, busy, decode_lifetimes_ms, alone_gap_ms))


def _busy_time(start_work: np.ndarray, finish_work: np.ndarray, phases: Phases) -> np.ndarray:
    """[O, 2]: time the LM spends serving prefill in phases B and C (service intervals of a single server do not
    overlap in work time, so their overlaps with each phase's work interval add up)."""
    a, b, rb, rc = _columns(phases)
    w_a = PAUSED_RATE * a
    w_b = w_a + rb * (b - a)
    in_b = np.clip(np.minimum(finish_work, w_b) - np.maximum(start_work, w_a), 0.0, None).sum(axis=1)
    in_c = np.clip(finish_work - np.maximum(start_work, w_b), 0.0, None).sum(axis=1)
    return np.stack([in_b / rb[:, 0], in_c / rc[:, 0]], axis=1)


def _columns(phases: Phases):
    a = phases.pause_end_ms[:, None]
    b = np.maximum(phases.drain_ms, phases.pause_end_ms)[:, None]
    rb = np.maximum(phases.rate_b, PAUSED_RATE)[:, None]
    rc = np.maximum(phases.rate_c, PAUSED_RATE)[:, None]
    return a, b, rb, rc


def _work_clock(t: np.ndarray, phases: Phases) -> np.ndarray:
    """Prefill tokens the LM could have served by time t under each plan."""
    a, b, rb, rc = _columns(phases)
    return (PAUSED_RATE * np.minimum(t, a) + rb * np.clip(t - a, 0.0, b - a) + rc * np.maximum(t - b, 0.0))


def _inverse_work_clock(w: np.ndarray, phases: Phases) -> np.ndarray:
    a, b, rb, rc = _columns(phases)
    w_a = PAUSED_RATE * a
    w_b = w_a + rb * (b - a)
    return np.where(w <= w_a, w / PAUSED_RATE, np.where(w <= w_b, a + (w - w_a) / rb, b + (w - w_b) / rc))


def _decode_delay(phases: Phases, prefill_done_ms: np.ndarray, busy_ms: np.ndarray, lifetimes_ms: np.ndarray,
                  alone_gap_ms: float) -> np.ndarray:
    """Sum over decodes of the time the plan costs them beyond decoding alone on the whole GPU (phase C lasts until
    the prefill backlog is done; after that every plan decodes the same)."""
    if lifetimes_ms.size == 0:
        return np.zeros(prefill_done_ms.shape)
    a = phases.pause_end_ms
    b = np.maximum(phases.drain_ms, a)
    c = np.maximum(prefill_done_ms, b)
    alive = _alive_time_function(lifetimes_ms)
    alive_b, alive_c = alive(b) - alive(a), alive(c) - alive(b)
    side_b = 1.0 - alone_gap_ms / np.maximum(phases.decode_gap_b, alone_gap_ms)
    side_c = 1.0 - alone_gap_ms / np.maximum(phases.decode_gap_c, alone_gap_ms)
    chunk_b = 1.0 - phases.decode_gap_b / np.maximum(phases.gap_b, phases.decode_gap_b)
    chunk_c = 1.0 - phases.decode_gap_c / np.maximum(phases.gap_c, phases.decode_gap_c)
    # decodes running on average in each phase, times the time the LM spends on mixed steps there
    mean_b = alive_b / np.maximum(b - a, 1e-9)
    mean_c = alive_c / np.maximum(c - b, 1e-9)
    chunks = mean_b * np.minimum(busy_ms[:, 0], b - a) * chunk_b + mean_c * np.minimum(busy_ms[:, 1], c - b) * chunk_c
    return alive(a) + alive_b * side_b + alive_c * side_c + chunks


def _alive_time_function(lifetimes_ms: np.ndarray):
    """t -> sum over decodes of min(lifetime, t): decode-time that falls before t."""
    ordered = np.sort(lifetimes_ms)
    finite = ordered[np.isfinite(ordered)]
    prefix = np.concatenate([[0.0], np.cumsum(finite)])
    count = ordered.size

    def alive(t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        ended = np.searchsorted(finite, t, side="right")
        return prefix[ended] + (count - ended) * t

    return alive
