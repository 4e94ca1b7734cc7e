"""The tensor-parallel executor: rank 0 in this process, ranks 1..N-1 in processes it spawns (worker.py), one GPU
each. See executor.py for what the engine gets from it.

`launch` packs the step as ModelRunner always does, writes those packed bytes plus a small header to the
shared-memory queue (step_message.py, shm_broadcast.py) and runs rank 0's share; every rank runs the same
collectives and samples the same tokens. Encoder batches go the same way (parallel_encoder.py). A thread watches
the worker processes: when one dies, every later call raises RankFailedError naming it (the engine then fails its
requests and reports dead; `on_failure` tells an idle engine at once), device communicators are aborted so no
kernel waits for it forever, and every wait for a peer has a deadline (`collective_timeout_s`).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import torch

from spaceserve.config import EngineConfig
from spaceserve.core.errors import ConfigError
from spaceserve.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from spaceserve.models.loader import build_model
from spaceserve.runtime.executor import RankFailedError, check_devices, model_directory
from spaceserve.runtime.input_batch import InputBatch, ModelInputs
from spaceserve.runtime.model_runner import StepHandle
from spaceserve.runtime.multiplex import resolve_layout
from spaceserve.runtime.parallel_encoder import DriverEncoderRunner, ItemMeta, TensorParallelEncoder
from spaceserve.runtime.parallel_state import (
    DistributedState,
    abort_distributed,
    create_store,
    destroy_distributed,
    init_distributed,
    time_decode_collectives,
)
from spaceserve.runtime.runner_setup import build_runners
from spaceserve.runtime.shm_broadcast import MessageQueue, PeerDiedError
from spaceserve.runtime.step_message import HEADER_BYTES, NO_STREAM, MessageKind, encode_message, step_message
from spaceserve.runtime.worker import WorkerSpec, describe_rank, rank_device, run_worker

logger = logging.getLogger(__name__)

_EXTRAS_BYTES = 1 << 20
"""Room in a queue slot for a message's JSON section (image hashes and splices, seeded and released ids)."""
_SHUTDOWN_JOIN_S = 10.0
_DEATH_NOTICE_S = 2.0


_LIVE: weakref.ref | None = None  # the process's running MultiprocExecutor (one per process: one default group)


class MultiprocExecutor:
    def __init__(self, config: EngineConfig, dtype: torch.dtype, device: torch.device) -> None:
        global _LIVE
        check_devices(config)
        previous = _LIVE() if _LIVE is not None else None
        if previous is not None and not previous._closed:
            raise ConfigError("one tensor-parallel engine per process: shut the running one down first")
        self.config = config
        self.encoder_worker = None  # the ranks encode themselves (config refuses an encoder process with tp > 1)
        parallel = config.parallel
        self.world_size = parallel.tensor_parallel_size
        self.timeout_s = parallel.collective_timeout_s
        self.device = rank_device(config, 0)
        self._closed = False
        self._failure: RankFailedError | None = None
        self._failure_callbacks: list[Callable[[RankFailedError], None]] = []
        self._send_lock = threading.Lock()
        self._store = create_store(self.world_size, self.timeout_s)
        self.queue = MessageQueue.create(self.world_size - 1, self._slot_bytes(config))
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._conns: list[multiprocessing.connection.Connection] = []
        self._finalizer = weakref.finalize(self, _terminate, self._procs, self.queue)
        self._stop_r, self._stop_w = multiprocessing.Pipe(duplex=False)
        self._monitor = threading.Thread(target=self._watch, name="spaceserve-rank-monitor", daemon=True)
        self.dist: DistributedState | None = None
        mode = parallel.mm_encoder_tp_mode
        try:
            self._start_workers()
            self.dist = init_distributed(0, self.world_size, self.device, store=self._store, timeout_s=self.timeout_s)
            self.model = build_model(
                config.model_config,
                directory=model_directory(config),
                load_format=config.load_format,
                dtype=dtype,
                device=self.device,
                seed=config.seed,
                parallel=self.dist.model_parallel(mode),
            )
            self.layout = resolve_layout(config, self.device)
            self.runner, _, self.memory_plan = build_runners(
                config, self.model, dtype, self.device, self.layout, tp_group=self.dist.tp
            )
            self._wait_ready()
        except BaseException as exc:
            failure = self._failure or self._worker_error()
            self.shutdown()
            if failure is not None:
                raise failure from exc
            raise
        self.runner.sampling_generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.runner.step_publisher = self._publish_step
        encoder = TensorParallelEncoder(self.model, self.device, self.dist.encoder, mode)
        self.encoder_runner = DriverEncoderRunner(encoder, self.layout, self._announce_encode, config.image_config)
        self._lm_stream_index = NO_STREAM
        self._dropped: list[tuple[str, int]] = []
        self._released: list[str] = []
        self._seeded: set[str] = set()
        self._generation = 0
        self._encoded: deque[tuple[str, int]] = deque()  # appended by whichever thread encodes
        self._pending: dict[str, int] = {}  # encoded, not yet seen in the engine's encoder outputs
        self._live: dict[str, int] = {}  # in the engine's encoder outputs (and so in every rank's store)
        _LIVE = weakref.ref(self)
        logger.info("tensor parallel: %d ranks, %d KV blocks each", self.world_size, self.memory_plan.num_kv_blocks)

    @property
    def model_runner(self) -> MultiprocExecutor:
        return self

    # ---- the ModelRunner interface the engine calls --------------------------------------------------------------

    def launch(self, scheduled: SchedulerOutput, encoder_outputs: Mapping[str, torch.Tensor]) -> StepHandle:
        self.check_health()
        self._dropped.extend(self._dropped_embeddings(encoder_outputs))  # sent with the next step that runs
        try:
            return self.runner.launch(scheduled, encoder_outputs)
        except Exception as exc:
            self._raise_failure_from(exc)
            raise

    def collect(self, handle: StepHandle) -> ModelRunnerOutput:
        try:
            output = self.runner.collect(handle)
        except Exception as exc:
            self._raise_failure_from(exc)
            raise
        self.check_health()  # a step that ran through aborted communicators returns garbage: never hand it out
        return output

    def execute(self, scheduled: SchedulerOutput, encoder_outputs: Mapping[str, torch.Tensor]) -> ModelRunnerOutput:
        return self.collect(self.launch(scheduled, encoder_outputs))

    def release(self, request_id: str) -> None:
        self.runner.release(request_id)
        if request_id in self._seeded:
            self._seeded.discard(request_id)
            self._released.append(request_id)

    def use_stream(self, stream: torch.cuda.Stream) -> None:
        self.runner.use_stream(stream)
        streams = self.layout.lm_streams
        self._lm_stream_index = streams.index(stream) if stream in streams else NO_STREAM

    @property
    def stream(self) -> torch.cuda.Stream | None:
        return self.runner.stream

    @property
    def kv_caches(self) -> list[torch.Tensor]:
        return self.runner.kv_caches

    @property
    def input_batch(self) -> InputBatch:
        return self.runner.input_batch

    @property
    def cuda_graphs(self):
        return self.runner.cuda_graphs

    @property
    def num_graphed_steps(self) -> int:
        return self.runner.num_graphed_steps

    @property
    def num_eager_steps(self) -> int:
        return self.runner.num_eager_steps

    # ---- messages to the other ranks ---------------------------------------------------------------------------

    def _send(self, parts) -> None:
        with self._send_lock:
            self.queue.write(parts, self.timeout_s, self.check_health)

    def _publish_step(self, inputs: ModelInputs) -> None:
        self.check_health()
        extras: dict[str, Any] = {}
        if self._released:
            extras["released"], self._released = self._released, []
        if self._dropped:
            extras["dropped"], self._dropped = self._dropped, []
        ids = inputs.sampled_request_ids
        for row, _ in inputs.sampling.seeded_generators:
            self._seeded.add(ids[row])
        packed = self.runner.input_batch.staging.last_step.packed_bytes()
        self._send(step_message(inputs, packed, self._lm_stream_index, extras))

    def _announce_encode(self, items: list[ItemMeta], stream: int) -> None:
        self.check_health()
        with self._send_lock:
            self._generation += 1
            generation = self._generation
            message = encode_message(
                MessageKind.ENCODE, extras={"items": items, "generation": generation}, stream=stream
            )
            self.queue.write(message, self.timeout_s, self.check_health)
        self._encoded.extend((item[0], generation) for item in items)

    def _dropped_embeddings(self, encoder_outputs: Mapping[str, torch.Tensor]) -> list[tuple[str, int]]:
        """(mm_hash, generation) of the embeddings the engine has dropped since the last step. A hash's rows join
        `_live` once the engine holds them; any later absence from encoder_outputs is an eviction. Every store adds
        a pending entry and every eviction shortens the dict, so nothing changed when neither happened."""
        while self._encoded:
            mm_hash, generation = self._encoded.popleft()
            self._pending[mm_hash] = generation
        if not self._pending and len(encoder_outputs) == len(self._live):
            return []
        for mm_hash in [h for h in self._pending if h in encoder_outputs]:
            self._live[mm_hash] = self._pending.pop(mm_hash)
        dropped = [(h, g) for h, g in self._live.items() if h not in encoder_outputs]
        for mm_hash, _ in dropped:
            del self._live[mm_hash]
        return dropped

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        """Every rank's answer to `method(*args)` (worker.py's rpc_* methods; JSON arguments), rank 0's first."""
        self.check_health()
        self._send(encode_message(MessageKind.RPC, extras={"method": method, "args": list(args)}))
        mine = getattr(self, f"_rpc_{method}")(*args)
        gathered = self.dist.tp.gather_objects(mine)
        self.check_health()
        return gathered

    def _rpc_last_sampled(self) -> list[int] | None:
        last = self.runner.last_sampled
        return None if last is None else last.tolist()

    def _rpc_describe(self) -> dict[str, Any]:
        return describe_rank(0, self.model, self.runner, len(self._live))

    def _rpc_time_decode_collectives(self, rows: int, iters: int) -> dict[str, float]:
        return time_decode_collectives(self.dist.tp, self.model.config.text, rows, iters)

    # ---- the worker processes ------------------------------------------------------------------------------------

    def _start_workers(self) -> None:
        context = multiprocessing.get_context("spawn")
        for rank in range(1, self.world_size):
            parent_end, child_end = context.Pipe(duplex=False)
            spec = WorkerSpec(self.config, rank, self.world_size, self._store.port, self.queue.handle)
            proc = context.Process(target=run_worker, args=(spec, child_end), name=f"spaceserve-rank{rank}", daemon=True)
            proc.start()
            child_end.close()
            self._procs.append(proc)
            self._conns.append(parent_end)
        self._monitor.start()

    def _slot_bytes(self, config: EngineConfig) -> int:
        sched = config.scheduler
        sizing = InputBatch(
            max_num_tokens=max(sched.max_num_batched_tokens, sched.max_num_seqs),  # graph sizes are <= max_num_seqs
            max_num_seqs=sched.max_num_seqs,
            max_model_len=sched.max_model_len,
            block_size=config.cache.block_size,
            vocab_size=config.model_config.text.vocab_size,
            device=torch.device("cpu"),
        )
        return HEADER_BYTES + sizing.staging.nbytes + _EXTRAS_BYTES

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        for rank, conn in enumerate(self._conns, start=1):
            while not conn.poll(0.1):
                self.check_health()
                if time.monotonic() > deadline:
                    raise RankFailedError(f"tensor-parallel rank {rank} did not start within {self.timeout_s:.0f} s")
            status, detail = conn.recv()
            if status != "ready":
                raise RankFailedError(f"tensor-parallel rank {rank} failed to start:\n{detail}")

    def _worker_error(self) -> RankFailedError | None:
        for rank, conn in enumerate(self._conns, start=1):
            try:
                if conn.poll():
                    status, detail = conn.recv()
                    if status == "error":
                        return RankFailedError(f"tensor-parallel rank {rank} failed:\n{detail}")
            except (EOFError, OSError):
                continue
        return None

    def _watch(self) -> None:
        sentinels = {proc.sentinel: rank for rank, proc in enumerate(self._procs, start=1)}
        ready = multiprocessing.connection.wait([*sentinels, self._stop_r])
        if self._stop_r in ready or self._closed:
            return
        rank = sentinels[next(s for s in ready if s in sentinels)]
        proc = self._procs[rank - 1]
        proc.join(1.0)
        detail = self._worker_error()
        message = f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}"
        self._failure = RankFailedError(message if detail is None else f"{message}: {detail}")
        logger.error("%s", self._failure)
        if self.dist is not None and self.device.type == "cuda":
            abort_distributed(self.dist)
        for callback in list(self._failure_callbacks):
            try:
                callback(self._failure)
            except Exception:  # noqa: BLE001 - a listener's failure must not hide the rank's
                logger.exception("rank failure callback failed")

    def on_failure(self, callback: Callable[[RankFailedError], None]) -> None:
        """Call `callback(error)` from the monitor thread when a rank dies (an idle engine learns of it at once)."""
        self._failure_callbacks.append(callback)

    def describe(self) -> dict[str, Any]:
        return {
            "tensor_parallel_size": self.world_size,
            "mm_encoder_tp_mode": self.config.parallel.mm_encoder_tp_mode,
            "worker_pids": [proc.pid for proc in self._procs],
        }

    def check_health(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise RankFailedError("the tensor-parallel executor was shut down")

    def _raise_failure_from(self, exc: BaseException) -> None:
        """A call failed: when a rank's death explains it, raise that instead. A collective fails as soon as its
        peer's sockets close, before the process is reaped, so the monitor gets a moment to see the exit."""
        if isinstance(exc, PeerDiedError) and self._failure is None:
            self._failure = RankFailedError(str(exc))
        deadline = time.monotonic() + _DEATH_NOTICE_S
        while self._failure is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._failure is not None:
            raise self._failure from exc

    def shutdown(self) -> None:
        """Stop the other ranks and leave the process group. Idempotent."""
        global _LIVE
        if self._closed:
            return
        healthy = self._failure is None and all(p.is_alive() for p in self._procs)
        self._closed = True
        if healthy:
            try:
                with self._send_lock:
                    self.queue.write(encode_message(MessageKind.SHUTDOWN), 1.0, lambda: None)
            except Exception:  # noqa: BLE001 - the workers are terminated below anyway
                pass
        for proc in self._procs:
            proc.join(_SHUTDOWN_JOIN_S if healthy else 0.5)
        self._stop_w.send(None)
        if self._monitor.is_alive():
            self._monitor.join(1.0)
        self._finalizer()
        destroy_distributed()
        if _LIVE is not None and _LIVE() is self:
            _LIVE = None


def _terminate(procs: list, queue: MessageQueue) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(2.0)
        if proc.is_alive():
            proc.kill()
    queue.close()
