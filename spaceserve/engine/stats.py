"""What the engine thread publishes about itself (a snapshot after each step) and the hook for per-request stats."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from spaceserve.core.outputs import RequestOutput


@dataclass(frozen=True)
class EngineStats:
    """What /metrics shows about the engine's state, as of the engine thread's latest step."""

    num_running: int = 0
    num_waiting: int = 0
    """Not yet scheduled: waiting in the LM scheduler or for their videos to be decoded."""
    num_kv_blocks: int = 0
    num_free_kv_blocks: int = 0
    kv_cache_usage: float = 0.0
    encoder_cache_usage: float = 0.0
    num_encoder_queued_items: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


class StatLogger(Protocol):
    def record_finished(self, output: RequestOutput) -> None:
        """Called on the engine thread with each request's last output (finished, aborted or failed)."""
        ...
