"""Resolves `--multiplex` into where the encoder and the language model run: which streams, on which SMs.

- time: no streams of its own; the engine runs the encoder inside its step, on the LM's stream.
- streams: the LM on one CUDA stream, the encoder on another, both over the whole device (no SM fence).
  On CPU: the encoder runs in a worker thread with no streams.
- space: two disjoint SM partitions from one green-context split; the LM uses its partition while an encoder batch
  is in flight and a stream over the whole device otherwise; the encoder uses its partition, or the whole device
  when the LM had nothing to run as its batch was dispatched.
- auto: space where green contexts work, otherwise time, with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from spaceserve.config import EngineConfig
from spaceserve.core.errors import ConfigError
from spaceserve.runtime.sm_partition import SMPartition, get_partition_manager, green_context_support

logger = logging.getLogger(__name__)

DEFAULT_ENCODER_SM_FRACTION = 0.4
"""Without --encoder-sms, space gives the encoder about this share of the SMs: decode is bandwidth-bound and
barely slows on the rest (DESIGN.md: a decode step on 84 of 132 SMs took 1.03x its whole-device time)."""


@dataclass(frozen=True)
class ExecutionLayout:
    mode: str
    """The mode that runs: time, streams or space."""
    requested: str
    reason: str
    """Why this mode (auto's choice, or "requested")."""
    lm_stream: torch.cuda.Stream | None
    """The LM's stream over the whole device; None on CPU or in time mode (the runner picks its own)."""
    lm_partition_stream: torch.cuda.Stream | None = None
    """space: the LM's stream on its SM partition, used while the encoder has a batch in flight."""
    encoder_stream: torch.cuda.Stream | None = None
    """streams/space: the stream encoder batches normally run on (space: the encoder partition)."""
    encoder_full_stream: torch.cuda.Stream | None = None
    """space: a stream over the whole device for encoder batches dispatched while the LM is idle."""
    partition: SMPartition | None = None

    @property
    def concurrent(self) -> bool:
        return self.mode != "time"

    @property
    def lm_streams(self) -> tuple[torch.cuda.Stream, ...]:
        return tuple(s for s in (self.lm_stream, self.lm_partition_stream) if s is not None)

    @property
    def num_encoder_streams(self) -> int:
        """Streams the encoder runs on concurrently with the LM (0: inside the LM's step)."""
        if not self.concurrent:
            return 0
        return max(1, len([s for s in (self.encoder_stream, self.encoder_full_stream) if s is not None]))

    def describe(self) -> dict[str, object]:
        described: dict[str, object] = {"multiplex": self.mode, "requested": self.requested, "reason": self.reason}
        if self.partition is not None:
            described.update(
                encoder_sms=self.partition.encoder_sms, lm_sms=self.partition.lm_sms, total_sms=self.partition.total_sms
            )
        return described


def resolve_layout(config: EngineConfig, device: torch.device) -> ExecutionLayout:
    requested = config.multiplex
    mode, reason = requested, "requested"
    if requested == "auto":
        unsupported = green_context_support(device)
        mode, reason = ("time", f"auto chose time: {unsupported}") if unsupported else ("space", "auto chose space")
        logger.info("multiplex %s", reason)
    if mode == "time":
        return ExecutionLayout("time", requested, reason, lm_stream=None)
    if device.type != "cuda":
        if mode == "space":
            raise ConfigError(
                f"multiplex 'space' needs CUDA green contexts to partition SMs, and this engine runs on {device.type}; "
                "use 'streams' (the encoder in a worker thread), 'time', or 'auto'"
            )
        return ExecutionLayout("streams", requested, reason + "; on CPU: the encoder in a worker thread", None)
    if mode == "streams":
        return ExecutionLayout(
            "streams", requested, reason, lm_stream=torch.cuda.Stream(device), encoder_stream=torch.cuda.Stream(device)
        )
    partition = get_partition_manager(device).partition(config.encoder_sms or _default_encoder_sms(device))
    logger.info(
        "space: encoder %d SMs, language model %d of %d SMs", partition.encoder_sms, partition.lm_sms, partition.total_sms
    )
    return ExecutionLayout(
        "space",
        requested,
        reason,
        lm_stream=torch.cuda.Stream(device),
        lm_partition_stream=partition.lm_stream,
        encoder_stream=partition.encoder_stream,
        encoder_full_stream=torch.cuda.Stream(device),
        partition=partition,
    )


def _default_encoder_sms(device: torch.device) -> int:
    total = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, round(total * DEFAULT_ENCODER_SM_FRACTION))
