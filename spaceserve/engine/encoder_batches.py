"""Bookkeeping around one encoder batch, shared by `time` (the batch runs inside the engine step) and the concurrent
modes (it runs in the encoder worker): taking the next batch from the encoder scheduler, storing what it produced,
and stamping the requests it served. All of it runs on the engine thread."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import torch

from spaceserve.core.request import Request
from spaceserve.core.scheduler_output import EncoderBatch
from spaceserve.kvcache.encoder_cache import EncoderCache
from spaceserve.sched.encoder_scheduler import EncoderScheduler


def take_encoder_batch(
    encoder_scheduler: EncoderScheduler, encoder_outputs: dict[str, torch.Tensor], requests: Mapping[str, Request]
) -> EncoderBatch | None:
    """The next batch in policy order (None if nothing fits). Drops the tensors of entries the cache evicted to make
    room, and stamps encoder_scheduled_time on the requests waiting for the batch."""
    batch = encoder_scheduler.schedule()
    for mm_hash in encoder_scheduler.pop_evicted():
        encoder_outputs.pop(mm_hash, None)
    if batch is not None:
        stamp_requests(requests, batch.request_ids, "encoder_scheduled_time", time.monotonic())
    return batch


def store_embeddings(
    embeddings: Mapping[str, torch.Tensor], encoder_outputs: dict[str, torch.Tensor], encoder_cache: EncoderCache
) -> None:
    for mm_hash, rows in embeddings.items():
        encoder_outputs[mm_hash] = rows
        encoder_cache.mark_ready(mm_hash)


def stamp_requests(requests: Mapping[str, Request], request_ids: Iterable[str], field: str, value: float) -> None:
    """Set a timestamp on those of `request_ids` still in flight (aborted ones are gone from `requests`)."""
    for request_id in request_ids:
        request = requests.get(request_id)
        if request is not None:
            setattr(request, field, value)
