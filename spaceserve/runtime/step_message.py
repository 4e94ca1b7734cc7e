"""The messages rank 0 sends the other tensor-parallel ranks (through shm_broadcast.MessageQueue): a fixed header
of int64 fields, then for a step the runner's packed staging bytes, then a small JSON section only when there are
strings to send. No Python object is pickled per step.

- STEP: the packed bytes rank 0 has just copied to its own device (input ids, positions, slots, block tables,
  sampling controls, and with overlapped scheduling the rows whose input token is the previous step's sampled id,
  which every rank takes from its own device: input_batch.py lays them out), the sizes that lay them out, the sampling flags, which LM
  stream to run on (space: the split rank 0 chose), and in the JSON section the image splices (mm_hash and rows),
  seeded rows (request id and seed: each rank keeps an identical generator), requests released and embeddings
  dropped since the last step. A rank rebuilds exactly rank 0's ModelInputs from it.
- ENCODE: an encoder batch (items' hashes, grids and token counts in the JSON section; the pixels follow as a
  broadcast on the encoder group) and which encoder stream to run it on.
- RPC: a method of the worker to call, its result gathered on rank 0 (tests and tools). SHUTDOWN: stop.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np
import torch

from spaceserve.layers.attention import AttentionMetadata
from spaceserve.layers.sampler import SamplingMetadata
from spaceserve.runtime.input_batch import ImageSplice, InputBatch, ModelInputs


class MessageKind(IntEnum):
    STEP = 1
    ENCODE = 2
    RPC = 3
    SHUTDOWN = 4


_FIELDS = (
    "kind",
    "payload_bytes",
    "extras_bytes",
    "num_tokens",
    "padded_tokens",
    "padded_seqs",
    "num_sampled",
    "num_banned",
    "num_placeholders",
    "graph_size",
    "flags",
    "stream",
)
_INDEX = {name: i for i, name in enumerate(_FIELDS)}
HEADER_BYTES = 8 * 16
_ALL_GREEDY, _TOP_K_TOP_P = 1, 2
NO_STREAM = -1
"""The runner's own stream (time mode) or, for an encoder batch, the stream current on rank 0's caller."""


@dataclass
class Message:
    kind: MessageKind
    header: np.ndarray
    payload: np.ndarray
    extras: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> int:
        return int(self.header[_INDEX[name]])


def encode_message(
    kind: MessageKind, payload: np.ndarray | None = None, extras: Mapping[str, Any] | None = None, **fields: int
) -> list[np.ndarray | bytes]:
    """The parts to write, in order: header, payload, JSON extras."""
    header = np.zeros(HEADER_BYTES // 8, dtype=np.int64)
    extras_bytes = json.dumps(extras, separators=(",", ":")).encode() if extras else b""
    header[_INDEX["kind"]] = int(kind)
    header[_INDEX["payload_bytes"]] = 0 if payload is None else payload.size
    header[_INDEX["extras_bytes"]] = len(extras_bytes)
    for name, value in fields.items():
        header[_INDEX[name]] = value
    parts: list[np.ndarray | bytes] = [header]
    if payload is not None:
        parts.append(payload)
    if extras_bytes:
        parts.append(extras_bytes)
    return parts


def decode_message(raw: np.ndarray) -> Message:
    """Parse bytes read from the queue; the payload is copied out, so the queue slot can be released at once."""
    header = raw[:HEADER_BYTES].view(np.int64).copy()
    payload_bytes, extras_bytes = int(header[_INDEX["payload_bytes"]]), int(header[_INDEX["extras_bytes"]])
    payload = raw[HEADER_BYTES : HEADER_BYTES + payload_bytes].copy()
    extras_raw = raw[HEADER_BYTES + payload_bytes : HEADER_BYTES + payload_bytes + extras_bytes]
    extras = json.loads(extras_raw.tobytes()) if extras_bytes else {}
    return Message(MessageKind(int(header[_INDEX["kind"]])), header, payload, extras)


# ---- steps ------------------------------------------------------------------------------------------------------


def step_message(
    inputs: ModelInputs, packed: np.ndarray, stream: int, extras: Mapping[str, Any]
) -> list[np.ndarray | bytes]:
    """Rank 0: the message for a step whose inputs it has just packed into `packed` (its staging bytes)."""
    sampling = inputs.sampling
    flags = (_ALL_GREEDY if sampling.all_greedy else 0) | (_TOP_K_TOP_P if sampling.needs_top_k_top_p else 0)
    step_extras = dict(extras)
    if inputs.image_splices:
        step_extras["splices"] = [[s.row, s.length, s.mm_hash, s.source_row] for s in inputs.image_splices]
    if sampling.seeded_generators:
        ids = inputs.sampled_request_ids
        step_extras["seeded"] = [[row, ids[row], gen.initial_seed()] for row, gen in sampling.seeded_generators]
    return encode_message(
        MessageKind.STEP,
        packed,
        step_extras,
        num_tokens=inputs.num_tokens,
        padded_tokens=inputs.input_ids.shape[0],
        padded_seqs=len(inputs.attn_metadata.query_lens_cpu),
        num_sampled=len(inputs.sampled_request_ids),
        num_banned=inputs.sampling.banned_flat_ids.numel(),
        num_placeholders=0 if inputs.placeholder_rows is None else inputs.placeholder_rows.numel(),
        graph_size=inputs.padded_size or 0,
        flags=flags,
        stream=stream,
    )


def inputs_from_step(
    message: Message, input_batch: InputBatch, generators: Mapping[str, torch.Generator]
) -> ModelInputs:
    """Rank r: rank 0's ModelInputs rebuilt on this rank's device from the packed bytes (one host->device copy, as
    on rank 0). `generators` holds this rank's generator of every seeded request."""
    num_seqs = message["padded_seqs"]
    num_sampled = message["num_sampled"]
    num_placeholders = message["num_placeholders"]
    fields = input_batch._fields(
        message["padded_tokens"], num_seqs, num_sampled, message["num_banned"], num_placeholders
    )
    step = input_batch.staging.begin(fields)
    step.load(message.payload)
    query_start = step.host["query_start_loc"]
    seq_lens = step.host["seq_lens"]
    device = step.copy()
    metadata = AttentionMetadata(
        query_start_loc=device["query_start_loc"],
        seq_lens=device["seq_lens"],
        block_tables=device["block_tables"],
        slot_mapping=device["slot_mapping"],
        query_lens_cpu=tuple(np.diff(query_start[: num_seqs + 1]).tolist()),
        seq_lens_cpu=tuple(seq_lens[:num_seqs].tolist()),
    )
    flags = message["flags"]
    seeded = tuple((row, generators[request_id]) for row, request_id, _ in message.extras.get("seeded", ()))
    sampling = SamplingMetadata(
        temperature=device["temperature"],
        top_k=device["top_k"],
        top_p=device["top_p"],
        banned_flat_ids=device["banned_flat_ids"],
        all_greedy=bool(flags & _ALL_GREEDY),
        needs_top_k_top_p=bool(flags & _TOP_K_TOP_P),
        seeded_generators=seeded,
    )
    splices = tuple(ImageSplice(row, length, mm_hash, source) for row, length, mm_hash, source in message.extras.get("splices", ()))
    return ModelInputs(
        input_ids=device["input_ids"],
        positions=device["positions"],
        attn_metadata=metadata,
        logits_indices=device["logits_indices"],
        sampling=sampling,
        sampled_request_ids=("",) * num_sampled,  # only rank 0 maps rows to requests
        image_splices=splices,
        num_tokens=message["num_tokens"],
        padded_size=message["graph_size"] or None,
        # overlapped scheduling: rows whose token this rank's previous step sampled (on its own device)
        placeholder_rows=device["placeholder_rows"] if num_placeholders else None,
        placeholder_sources=device["placeholder_sources"] if num_placeholders else None,
    )
