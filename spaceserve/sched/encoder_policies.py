"""Encoder queue orderings, as pure functions from (waiting request, queue state) to a sort key (smaller first).

A queued item (an image or a video chunk) may be awaited by several requests (the same image in several prompts);
its key is the smallest key over them, so it runs as early as its most urgent requester needs it. A video is queued
as its chunks, so its remaining work shrinks chunk by chunk and short images in its window can run between them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from spaceserve.config import EncoderPolicy

SortKey = tuple[float, ...]


@dataclass(frozen=True)
class WaitingRequest:
    """One request waiting for one queued image."""

    request_id: str
    arrival_time: float
    feature_index: int
    """Index of the item in the request's mm_features (its order in the prompt; a video's chunks in order)."""
    request_order: int
    """Order in which the scheduler first saw the request: separates requests with equal arrival times."""


@dataclass(frozen=True)
class QueueState:
    remaining_patches: Mapping[str, int]
    """request id -> total num_patches of its items still queued (not yet handed to the encoder), including the
    chunks of its videos whose frames are still being decoded."""
    window_s: float
    window_origin: float
    """twsrft windows are [origin + k * window_s, origin + (k + 1) * window_s)."""


PolicyKey = Callable[[WaitingRequest, QueueState], SortKey]


def fcfs_key(waiter: WaitingRequest, state: QueueState) -> SortKey:
    """Earliest-arriving request first, its images in prompt order."""
    return (waiter.arrival_time, waiter.request_order, waiter.feature_index)


def window_index(arrival_time: float, state: QueueState) -> int:
    return math.floor((arrival_time - state.window_origin) / state.window_s)


def twsrft_key(waiter: WaitingRequest, state: QueueState) -> SortKey:
    """Time-windowed shortest-remaining-first: earlier arrival windows first; within a window, the request with
    the fewest remaining patches first (short requests get their first token sooner without starving long ones,
    which a later window can never overtake); ties in FCFS order."""
    if state.window_s <= 0:
        return (0, 0) + fcfs_key(waiter, state)
    return (
        window_index(waiter.arrival_time, state),
        state.remaining_patches.get(waiter.request_id, 0),
    ) + fcfs_key(waiter, state)


POLICIES: dict[str, PolicyKey] = {"fcfs": fcfs_key, "twsrft": twsrft_key}


def get_policy(name: EncoderPolicy) -> PolicyKey:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown encoder policy {name!r}; choose one of {sorted(POLICIES)}") from None
