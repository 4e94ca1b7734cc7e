"""Resolves `--multiplex` into where the encoder and the language model run: which streams, on which SMs.

- time: no streams of its own; the engine runs the encoder inside its step, on the LM's stream.
- streams: the LM on one CUDA stream, the encoder on another, both over the whole device (no SM fence).
  On CPU: the encoder runs in a worker thread with no streams.
- space: disjoint SM partitions, one green-context split per configured encoder share; the LM uses its side of the
  split while an encoder batch is in flight and a stream over the whole device otherwise; the encoder uses its side,
  or the whole device. The engine's SM allocator (engine/sm_allocation.py) picks among these splits per batch from
  measured curves; `partition_for` (the largest encoder share while the LM runs few sequences, the smallest once it
  runs many) is the fixed policy used when no allocator is attached.
- mps: the encoder in a process of its own, the LM on a stream of this one, each capped by an NVIDIA MPS
  active-thread percentage (runtime/mps.py); no SM fence beyond that.
- auto: space where green contexts work, otherwise time, with the reason.

`encoder_process` (always with mps; on request with streams and space) runs the encoder in a process of its own
(runtime/encoder_process.py): this process then keeps only the LM's streams (for space: its side of each split, the
encoder process making the same splits and taking the other side).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from spaceserve.config import EngineConfig
from spaceserve.core.errors import ConfigError
from spaceserve.runtime.sm_partition import SMPartition, get_partition_manager, green_context_support

logger = logging.getLogger(__name__)

DEFAULT_ENCODER_SM_FRACTIONS = (0.25, 0.5, 0.75)
"""Without --encoder-sms, space's splits give the encoder about these shares of the SMs (32, 64 and 96 of an H100's
or H200's 132, after the driver's rounding), for the allocator to choose from; each split costs a set of decode graphs
on its LM side and of vision graphs on its encoder side."""

LIGHT_LOAD_SEQS = 16
"""At most this many running sequences: the LM is lightly loaded and the encoder gets the largest split."""


@dataclass(frozen=True)
class ExecutionLayout:
    mode: str
    """The mode that runs: time, streams or space."""
    requested: str
    reason: str
    """Why this mode (auto's choice, or "requested")."""
    lm_stream: torch.cuda.Stream | None
    """The LM's stream over the whole device; None on CPU or in time mode (the runner picks its own)."""
    encoder_stream: torch.cuda.Stream | None = None
    """streams: the encoder's stream (space: each partition has its own)."""
    encoder_full_stream: torch.cuda.Stream | None = None
    """space: a stream over the whole device for encoder batches dispatched while the LM is idle."""
    partitions: tuple[SMPartition, ...] = ()
    """space: the splits, smallest encoder share first."""
    encoder_process: bool = False
    """The encoder runs in a process of its own; this process's encoder streams, if any, go unused."""

    def partition_for(self, num_running: int) -> SMPartition:
        if not self.partitions:
            raise RuntimeError(f"{self.mode} has no SM partitions")
        return self.partitions[-1] if num_running <= LIGHT_LOAD_SEQS else self.partitions[0]

    @property
    def total_sms(self) -> int:
        """The device's SMs (space); 0 without partitions."""
        return self.partitions[0].total_sms if self.partitions else 0

    @property
    def encoder_sms_counts(self) -> tuple[int, ...]:
        """The encoder shares of the splits (space), smallest first."""
        return tuple(p.encoder_sms for p in self.partitions)

    def partition_with(self, encoder_sms: int) -> SMPartition:
        for partition in self.partitions:
            if partition.encoder_sms == encoder_sms:
                return partition
        raise KeyError(f"no split gives the encoder {encoder_sms} SMs; the layout has {self.encoder_sms_counts}")

    @property
    def concurrent(self) -> bool:
        return self.mode != "time"

    @property
    def lm_streams(self) -> tuple[torch.cuda.Stream, ...]:
        """Every stream the LM runs on: the whole device first, then its side of each split."""
        streams = [self.lm_stream] if self.lm_stream is not None else []
        return tuple(streams + [p.lm_stream for p in self.partitions])

    @property
    def encoder_streams(self) -> tuple[torch.cuda.Stream, ...]:
        """Every stream the encoder runs on concurrently with the LM in this process (time: none, it runs on the
        LM's stream; none either when it runs in a process of its own)."""
        if self.encoder_process:
            return ()
        streams = [self.encoder_stream, self.encoder_full_stream, *(p.encoder_stream for p in self.partitions)]
        return tuple(s for s in streams if s is not None)

    @property
    def num_encoder_streams(self) -> int:
        """Streams the encoder runs on concurrently with the LM in this process (0: inside the LM's step, or in a
        process of its own)."""
        if not self.concurrent or self.encoder_process:
            return 0
        return max(1, len(self.partitions) + int(self.encoder_full_stream is not None))

    def describe(self) -> dict[str, object]:
        described: dict[str, object] = {"multiplex": self.mode, "requested": self.requested, "reason": self.reason}
        if self.encoder_process:
            described["encoder_process"] = True
        if self.partitions:
            described["total_sms"] = self.partitions[0].total_sms
            described["splits"] = [{"encoder_sms": p.encoder_sms, "lm_sms": p.lm_sms} for p in self.partitions]
            described["light_load_seqs"] = LIGHT_LOAD_SEQS
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
    in_process = not config.encoder_process
    if device.type != "cuda":
        if mode in ("space", "mps"):
            needs = "CUDA green contexts to partition SMs" if mode == "space" else "CUDA (NVIDIA MPS)"
            raise ConfigError(
                f"multiplex {mode!r} needs {needs}, and this engine runs on {device.type}; use 'streams' (the encoder "
                "in a worker thread, or with encoder_process in a process of its own), 'time', or 'auto'"
            )
        where = "a worker thread" if in_process else "a process of its own"
        return ExecutionLayout("streams", requested, f"{reason}; on CPU: the encoder in {where}", None,
                               encoder_process=not in_process)
    if mode == "mps":
        return ExecutionLayout("mps", requested, reason, lm_stream=torch.cuda.Stream(device), encoder_process=True)
    if mode == "streams":
        return ExecutionLayout(
            "streams", requested, reason, lm_stream=torch.cuda.Stream(device),
            encoder_stream=torch.cuda.Stream(device) if in_process else None, encoder_process=not in_process,
        )
    manager = get_partition_manager(device)
    counts = config.encoder_sms or _default_encoder_sms(device)
    partitions = {p.encoder_sms: p for p in (manager.partition(count) for count in counts)}  # rounding may merge two
    ordered = _runnable(tuple(partitions[count] for count in sorted(partitions)), config, device)
    for p in ordered:
        logger.info("space: encoder %d SMs, language model %d of %d SMs", p.encoder_sms, p.lm_sms, p.total_sms)
    return ExecutionLayout(
        "space",
        requested,
        reason,
        lm_stream=torch.cuda.Stream(device),
        encoder_full_stream=torch.cuda.Stream(device),
        partitions=ordered,
        encoder_process=not in_process,
    )


def _runnable(partitions: tuple, config: EngineConfig, device: torch.device) -> tuple:
    """The splits whose both sides run the model's GEMMs (probed in child processes, runtime/sm_probe.py): on an
    H200 a small remainder side failed cuBLAS launches that the larger sides ran."""
    from spaceserve.runtime.sm_probe import model_gemm_shapes, usable_encoder_groups

    usable, failed = usable_encoder_groups(device.index or 0, [p.encoder_sms for p in partitions],
                                           model_gemm_shapes(config))
    if not usable:
        raise ConfigError("space: no split of " + ", ".join(str(p.encoder_sms) for p in partitions) + " encoder SMs "
                          "runs the model's GEMMs on both sides: " + "; ".join(
                              f"{p.side} side of {p.encoder_sms} ({p.sms} SMs): {p.error}" for p in failed))
    for probe in failed:
        logger.warning("space: the %d-SM split is left out: its %s side (%d SMs) failed: %s", probe.encoder_sms,
                       probe.side, probe.sms, probe.error)
    return tuple(p for p in partitions if p.encoder_sms in usable)


def _default_encoder_sms(device: torch.device) -> tuple[int, ...]:
    total = torch.cuda.get_device_properties(device).multi_processor_count
    return tuple(max(1, round(total * fraction)) for fraction in DEFAULT_ENCODER_SM_FRACTIONS)
