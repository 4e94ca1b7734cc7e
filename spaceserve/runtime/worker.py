"""A tensor-parallel rank other than 0: its own process and GPU, its shard of the model, KV cache, CUDA graphs and
copy of the execution layout, running whatever rank 0 sends (runtime/executor.py starts it).

Start-up runs in lockstep with rank 0 (the same `build_runners`: profiling and graph capture issue
collectives, and the ranks agree on the KV block count), then the process reports ready and loops: read a message
from the shared-memory queue, copy it out, acknowledge it, act on it.

- STEP: rebuild rank 0's inputs from the packed bytes on this rank's device (step_message.py) and run them on the
  LM stream rank 0 chose, eagerly or as the same CUDA graph; sample from the all-gathered logits with generators
  seeded as rank 0's, so this rank's sampled ids (kept on its device) equal rank 0's.
- ENCODE: receive the pixels, encode (parallel_encoder.py) on the encoder stream rank 0 chose, keep the
  embeddings in the ReplicatedEmbeddings with the batch's CUDA event.
- RPC: call one of the `rpc_*` methods and gather its result on rank 0. SHUTDOWN: leave.

Launches are asynchronous on CUDA, so this loop runs ahead of its GPU like rank 0's does; it never waits on an
encoder batch on the host (the LM stream waits on the batch's event). A failure anywhere ends the process with a
non-zero code after reporting the error on its pipe; rank 0 watches for that. The process also ends if rank 0's
process goes away.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spaceserve.config import EngineConfig
from spaceserve.models.loader import build_model, resolve_dtype
from spaceserve.runtime.multiplex import resolve_layout
from spaceserve.runtime.parallel_encoder import ReplicatedEmbeddings, TensorParallelEncoder, encoder_streams
from spaceserve.runtime.parallel_state import (
    DistributedState,
    destroy_distributed,
    init_distributed,
    time_decode_collectives,
)
from spaceserve.runtime.runner_setup import build_runners
from spaceserve.runtime.shm_broadcast import MessageQueue, MessageQueueHandle
from spaceserve.runtime.step_message import Message, MessageKind, decode_message, inputs_from_step

logger = logging.getLogger(__name__)

_IDLE_POLL_S = 1.0


@dataclass(frozen=True)
class WorkerSpec:
    config: EngineConfig
    rank: int
    world_size: int
    store_port: int
    queue: MessageQueueHandle


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    device = torch.device(config.device)
    return torch.device("cuda", rank) if device.type == "cuda" else device


def run_worker(spec: WorkerSpec, conn) -> None:
    """The process's entry point (multiprocessing spawn)."""
    try:
        worker = Worker(spec)
    except BaseException:  # noqa: BLE001 - reported to rank 0, then the process ends
        conn.send(("error", traceback.format_exc()))
        raise SystemExit(1)
    conn.send(("ready", worker.num_kv_blocks))
    try:
        worker.run()
    except BaseException:  # noqa: BLE001
        conn.send(("error", traceback.format_exc()))
        raise SystemExit(1)
    finally:
        worker.close()


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        config = spec.config
        self.config = config
        self.rank = spec.rank
        self.device = rank_device(config, spec.rank)
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world_size))
        self.queue = MessageQueue.attach(spec.queue, spec.rank - 1)
        timeout = config.parallel.collective_timeout_s
        self.dist: DistributedState = init_distributed(
            spec.rank, spec.world_size, self.device, store_port=spec.store_port, timeout_s=timeout
        )
        dtype = resolve_dtype(config.dtype, config.model_config)
        directory = None if config.model_dir is None else Path(config.model_dir)
        self.model = build_model(
            config.model_config,
            directory=directory,
            load_format=config.load_format,
            dtype=dtype,
            device=self.device,
            seed=config.seed,
            parallel=self.dist.model_parallel(config.parallel.mm_encoder_tp_mode),
        )
        self.layout = resolve_layout(config, self.device)
        self.runner, _, plan = build_runners(config, self.model, dtype, self.device, self.layout, tp_group=self.dist.tp)
        self.num_kv_blocks = plan.num_kv_blocks
        self.runner.sampling_generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.encoder = TensorParallelEncoder(self.model, self.device, self.dist.encoder, config.parallel.mm_encoder_tp_mode)
        self._encoder_streams = encoder_streams(self.layout)
        self.store = ReplicatedEmbeddings()
        self.generators: dict[str, torch.Generator] = {}
        parent = multiprocessing.parent_process()
        self._parent_alive = parent.is_alive if parent is not None else (lambda: True)

    def run(self) -> None:
        while True:
            raw = self.queue.read(_IDLE_POLL_S)
            if raw is None:
                if not self._parent_alive():
                    return
                continue
            message = decode_message(raw)
            self.queue.ack()
            if message.kind is MessageKind.STEP:
                self._step(message)
            elif message.kind is MessageKind.ENCODE:
                self._encode(message)
            elif message.kind is MessageKind.RPC:
                self._rpc(message)
            else:
                return

    def close(self) -> None:
        self.queue.close()
        destroy_distributed()

    # ---- messages -----------------------------------------------------------------------------------------------

    def _step(self, message: Message) -> None:
        extras = message.extras
        for request_id in extras.get("released", ()):
            self.generators.pop(request_id, None)
        for mm_hash, generation in extras.get("dropped", ()):
            self.store.drop(mm_hash, generation)
        for _, request_id, seed in extras.get("seeded", ()):
            if request_id not in self.generators:
                self.generators[request_id] = torch.Generator(device=self.device).manual_seed(seed)
        if message["stream"] >= 0:
            self.runner.use_stream(self.layout.lm_streams[message["stream"]])
        splices: dict[str, torch.Tensor] = {}

        def prepare():
            inputs = inputs_from_step(message, self.runner.input_batch, self.generators)
            stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
            for splice in inputs.image_splices:
                splices.setdefault(splice.mm_hash, self.store.rows_for(splice.mm_hash, stream))
            return inputs

        self.runner.launch_prepared(prepare, splices)

    def _encode(self, message: Message) -> None:
        items = [tuple(item) for item in message.extras["items"]]
        index = message["stream"]
        stream = self._encoder_streams[index] if index >= 0 else None
        if stream is None:
            embeddings, ready = self._encode_on_current(items)
        else:
            with torch.cuda.stream(stream):
                embeddings, ready = self._encode_on_current(items)
        self.store.put(embeddings, message.extras["generation"], ready)

    def _encode_on_current(self, items):
        embeddings = self.encoder.encode(items, None)
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        return embeddings, ready

    def _rpc(self, message: Message) -> None:
        method = getattr(self, f"rpc_{message.extras['method']}")
        self.dist.tp.gather_objects(method(*message.extras.get("args", ())))

    # ---- RPCs (tests and tools) ---------------------------------------------------------------------------------

    def rpc_last_sampled(self) -> list[int] | None:
        last = self.runner.last_sampled
        return None if last is None else last.tolist()

    def rpc_describe(self) -> dict[str, Any]:
        return describe_rank(self.rank, self.model, self.runner, len(self.store))

    def rpc_time_decode_collectives(self, rows: int, iters: int) -> dict[str, float]:
        return time_decode_collectives(self.dist.tp, self.model.config.text, rows, iters)


def describe_rank(rank: int, model: torch.nn.Module, runner, num_embeddings: int) -> dict[str, Any]:
    """What a rank holds (the same fields on rank 0 and the others)."""
    caches = runner.kv_caches
    return {
        "rank": rank,
        "parameters": sum(p.numel() for p in model.parameters()),
        "kv_cache_shape": list(caches[0].shape) if caches else [],
        "stored_embeddings": num_embeddings,
        "graphed_steps": runner.num_graphed_steps,
        "eager_steps": runner.num_eager_steps,
    }
