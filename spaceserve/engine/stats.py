"""What the engine core publishes about itself (a snapshot with each step's outputs) and the hook for per-request
stats."""

from __future__ import annotations

from typing import Protocol

from spaceserve.core.engine_messages import EngineCoreStats
from spaceserve.core.outputs import RequestOutput

EngineStats = EngineCoreStats
"""What /metrics shows about the engine's state, as of the engine core's latest step."""


class StatLogger(Protocol):
    def record_finished(self, output: RequestOutput) -> None:
        """Called on the front's output thread with each request's last output (finished, aborted or failed)."""
        ...
