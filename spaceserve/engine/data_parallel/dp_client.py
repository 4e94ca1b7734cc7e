"""DPCoreClient: the CoreClient of a front with several engine-core replicas (vLLM's DP clients play this part).

AsyncLLM talks to it as to one core. It holds one client per replica (local processes, or Ray actors reached over
TCP) and:

- routes each request (router.py) to one replica and remembers where it went; aborts go to that replica only;
- sends utility calls to every live replica and combines the answers (any unfinished, every one idle and clean,
  summed block counts and counters; otherwise the list of answers);
- merges the replicas' outputs for the front's one output thread with a zmq Poller over their output sockets,
  replacing each step's stats with the sum over the live replicas. Measured against a reader thread per replica
  feeding a queue (scripts/dp_output_merge_bench.py, docs/SCALING.md): the same median delivery (0.1-0.3 ms) and
  CPU, but threads once let the p99 reach 44 ms at 8 replicas (GIL convoys among 9 threads) where the poller
  stayed under 2 ms; the poller also needs no thread per replica;
- survives a replica that dies: its requests that produced nothing yet are sent to another replica, the others end
  with an error output, the router stops sending to it and `health()` says degraded. Only when every replica is
  gone does get_output report EngineCoreDead, which ends the front like a single core's death.

The front's threads: any thread routes and sends (under this client's lock); the output thread calls get_output.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

import zmq

from spaceserve.config import DataParallelConfig, EngineConfig
from spaceserve.core.engine_messages import (
    CoreOutput,
    EngineCoreDead,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreStats,
    FinishReason,
    StepOutputs,
)
from spaceserve.core.request import Request
from spaceserve.engine.core_client import CoreClient, EngineDeadError, MPClient
from spaceserve.engine.data_parallel.launch import ReplicaSet, start_replicas
from spaceserve.engine.data_parallel.router import (
    ImageRef,
    NoReplicaError,
    RouteDecision,
    RouteRequest,
    Router,
    RouterConfig,
)
from spaceserve.kvcache.prefix_hash import block_extra_keys, hash_block

logger = logging.getLogger(__name__)

_LIVENESS_POLL_S = 0.5
MAX_ROUTED_BLOCKS = 256
"""The router looks at a prompt's first 256 KV blocks (4096 tokens at block size 16): where shared system prompts
and images sit; hashing more would cost the event loop time for no better choice."""
_SUMMED_COUNTERS = ("engine_counters", "loop_counters")
RECENT_DECISIONS = 4096


class DPCoreClient(CoreClient):
    def __init__(self, config: EngineConfig, replica_set: ReplicaSet | None = None) -> None:
        """Start config.data_parallel.data_parallel_size replicas (or take `replica_set`, already started) and
        return once every one is ready; a replica's start-up error stops the others and is raised."""
        super().__init__()
        dp = config.data_parallel
        self.data_parallel = dp
        self.replica_set = replica_set or start_replicas(replace(config, data_parallel=DataParallelConfig()), dp)
        self.replicas: list[MPClient] = self.replica_set.clients
        self.size = len(self.replicas)
        self.info = _combined_info(self.replicas, dp)
        self.router = Router(
            self.size,
            RouterConfig(
                policy=dp.router_policy,
                image_capacity_tokens=config.encoder.cache_tokens,
                prefix_capacity_blocks=min(replica.info["num_kv_blocks"] for replica in self.replicas),
            ),
        )
        self._block_size = config.cache.block_size
        self._max_model_len = config.scheduler.max_model_len
        self._lock = threading.RLock()
        self._unstarted: dict[str, Request] = {}
        """Requests routed whose replica has sent nothing for them yet: re-sent elsewhere if that replica dies."""
        self._dead: dict[int, str] = {}
        self._stats: list[EngineCoreStats | None] = [None] * self.size
        self._ready: deque[CoreOutput] = deque()
        self._poller = zmq.Poller()
        self._replica_of_socket: dict[zmq.Socket, int] = {}
        for index, replica in enumerate(self.replicas):
            self._poller.register(replica.output_socket, zmq.POLLIN)
            self._replica_of_socket[replica.output_socket] = index
        self._last_liveness_check = time.monotonic()
        self._shutting_down = False
        self.recent_decisions: OrderedDict[str, list[RouteDecision]] = OrderedDict()
        """The latest requests' routing decisions (a retried request has two), for debugging and tests."""

    # ---- requests (any thread) -----------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        route = self.route_request(request)  # hashing outside the lock
        with self._lock:
            self._send_routed(request, route, retry=False)

    def route_request(self, request: Request) -> RouteRequest:
        return route_request(request, self._block_size, self._max_model_len)

    def _send_routed(self, request: Request, route: RouteRequest, retry: bool) -> int:
        """Route and send (the lock is held); a replica found dead on the way is handled and the next one tried."""
        while True:
            try:
                decision = self.router.route(route, retry=retry)
            except NoReplicaError:
                raise EngineDeadError(self._dead_summary()) from None
            try:
                self.replicas[decision.replica].add_request(request)
            except EngineDeadError:
                self.router.finish(request.request_id)
                reason = self.replicas[decision.replica]._exit_reason() or "its core is not reachable"
                self._replica_died(decision.replica, reason)
                continue
            except BaseException:
                self.router.finish(request.request_id)
                raise
            self._unstarted[request.request_id] = request
            self.recent_decisions.setdefault(request.request_id, []).append(decision)
            while len(self.recent_decisions) > RECENT_DECISIONS:
                self.recent_decisions.popitem(last=False)
            return decision.replica

    def abort_requests(self, request_ids: list[str], reason: FinishReason = FinishReason.ABORT) -> None:
        by_replica: dict[int, list[str]] = defaultdict(list)
        with self._lock:
            for request_id in request_ids:
                index = self.router.replica_of(request_id)
                if index is None:
                    continue
                self.router.finish(request_id)
                self._unstarted.pop(request_id, None)
                by_replica[index].append(request_id)
            for index, ids in by_replica.items():
                if index not in self._dead:
                    self.replicas[index].abort_requests(ids, reason)

    def replica_of(self, request_id: str) -> int | None:
        """The replica serving a request in flight (None once it finished)."""
        with self._lock:
            return self.router.replica_of(request_id)

    # ---- utility calls -------------------------------------------------------------------------------------

    def call_utility_async(self, method: str | Callable[[Any], Any], *args: Any) -> Future:
        """Call an EngineCore utility on every live replica; the future gets the combined answer."""
        if callable(method):
            raise RuntimeError("run_in_engine needs an in-process engine core; data-parallel replicas are processes")
        with self._lock:
            live = [index for index in range(self.size) if index not in self._dead]
        if not live:
            raise EngineDeadError(self._dead_summary())
        parts = [self.replicas[index].call_utility_async(method, *args) for index in live]
        combined: Future = Future()
        remaining = [len(parts)]
        lock = threading.Lock()

        def done(_: Future) -> None:
            with lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            errors = [(index, part.exception()) for index, part in zip(live, parts) if part.exception() is not None]
            if errors:
                index, error = errors[0]
                kind = EngineDeadError if isinstance(error, EngineDeadError) else RuntimeError
                combined.set_exception(kind(f"replica {index}: {error}"))
            else:
                combined.set_result(_combine(method, [part.result() for part in parts]))

        for part in parts:
            part.add_done_callback(done)
        return combined

    def call_utility_on(self, replica: int, method: str, *args: Any) -> Future:
        """One replica's answer."""
        return self.replicas[replica].call_utility_async(method, *args)

    # ---- outputs (the front's output thread) ---------------------------------------------------------------

    def get_output(self, timeout_s: float | None = None) -> CoreOutput | None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self._ready:
                return self._ready.popleft()
            if self.dead_error is not None:
                return EngineCoreDead(str(self.dead_error))
            now = time.monotonic()
            if now - self._last_liveness_check >= _LIVENESS_POLL_S:
                self._last_liveness_check = now
                self._check_liveness()
                continue
            wait = self._last_liveness_check + _LIVENESS_POLL_S - now
            if deadline is not None:
                wait = min(wait, deadline - now)
            for socket, _ in self._poller.poll(max(int(wait * 1000), 0)):
                index = self._replica_of_socket[socket]
                while index not in self._dead and socket.poll(0, zmq.POLLIN):
                    self._take(index, self.replicas[index].get_output(0))
            if not self._ready and deadline is not None and time.monotonic() >= deadline:
                return None

    def _check_liveness(self) -> None:
        """A replica whose process (or actor) ended says so only when asked: ask every live one, also while others
        keep the poller busy."""
        for index in range(self.size):
            if index not in self._dead:
                self._take(index, self.replicas[index].get_output(0))

    def _take(self, index: int, message: CoreOutput | None) -> None:
        if isinstance(message, StepOutputs):
            self._take_step(index, message.outputs)
        elif isinstance(message, EngineCoreDead):
            self._replica_died(index, message.error)
        # utility answers resolved their futures in the replica's get_output

    def _take_step(self, index: int, outputs: EngineCoreOutputs) -> None:
        with self._lock:
            if outputs.stats is not None:
                self._stats[index] = outputs.stats
            kept = []
            for output in outputs.outputs:
                if self.router.replica_of(output.request_id) != index:
                    continue  # finished or aborted here meanwhile
                kept.append(output)
                if output.new_token_ids or output.finish_reason is not None:
                    self._unstarted.pop(output.request_id, None)
                self.router.on_output(output.request_id, len(output.new_token_ids))
                if output.finish_reason is not None:
                    self.router.finish(output.request_id)
            if kept or outputs.stats is not None:
                self._ready.append(StepOutputs(EngineCoreOutputs(kept, self._combined_stats())))

    def _replica_died(self, index: int, error: str) -> None:
        with self._lock:
            if index in self._dead:
                return
            self._dead[index] = error
            self._stats[index] = None
            self._poller.unregister(self.replicas[index].output_socket)
            lost = self.router.remove_replica(index)
            if self._shutting_down or not self.router.num_alive:
                for request_id in lost:
                    self._unstarted.pop(request_id, None)
                if not self._shutting_down:
                    logger.error("data-parallel replica %d failed (%s): no replica is left", index, error)
                self._fail_everything_if_all_dead()  # the front then fails every request with EngineDeadError
                return
            retried, failed = [], []
            for request_id in lost:
                request = self._unstarted.pop(request_id, None)
                if request is not None:
                    try:
                        self._send_routed(request, self.route_request(request), retry=True)
                        retried.append(request_id)
                        continue
                    except EngineDeadError:
                        pass
                message = f"data-parallel replica {index} failed while serving this request: {error}"
                failed.append(EngineCoreOutput(request_id, finish_reason=FinishReason.ERROR, error=message))
            logger.error(
                "data-parallel replica %d failed (%s): %d of its requests retried on another replica, %d failed; "
                "%d of %d replicas left",
                index, error, len(retried), len(failed), self.router.num_alive, self.size,
            )
            if failed:
                self._ready.append(StepOutputs(EngineCoreOutputs(failed, self._combined_stats())))
            self._fail_everything_if_all_dead()

    def _fail_everything_if_all_dead(self) -> None:
        if len(self._dead) == self.size and self.dead_error is None:
            self._mark_dead(EngineDeadError(self._dead_summary()))

    def _combined_stats(self) -> EngineCoreStats:
        live = [stats for stats in self._stats if stats is not None]
        total = EngineCoreStats()
        for stats in live:
            for name in ("num_running", "num_waiting", "num_kv_blocks", "num_free_kv_blocks", "num_encoder_queued_items",
                         "num_preemptions", "prefix_cache_queries", "prefix_cache_hits"):
                setattr(total, name, getattr(total, name) + getattr(stats, name))
        if total.num_kv_blocks:
            total.kv_cache_usage = 1.0 - total.num_free_kv_blocks / total.num_kv_blocks
        if live:
            total.encoder_cache_usage = sum(stats.encoder_cache_usage for stats in live) / len(live)
        allocator: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for stats in live:  # space: the replicas' allocator counters, summed per name and labels
            for name, labels, value in stats.allocator:
                key = (name, tuple(sorted(labels.items())))
                allocator[key] = allocator.get(key, 0.0) + value
        total.allocator = [(name, dict(labels), value) for (name, labels), value in allocator.items()]
        return total

    def _dead_summary(self) -> str:
        failures = "; ".join(f"replica {index}: {error}" for index, error in sorted(self._dead.items()))
        return f"every data-parallel replica has stopped ({failures})"

    # ---- state -----------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """ok: every replica serves; degraded: some failed and the rest serve; dead: none is left."""
        with self._lock:
            replicas = []
            for index, state in enumerate(self.router.replicas):
                replicas.append({
                    "replica": index,
                    "alive": index not in self._dead,
                    "error": self._dead.get(index),
                    "requests_in_flight": state.requests,
                    "outstanding_tokens": state.outstanding_tokens,
                    **self.replica_set.placements[index],
                })
            alive = self.size - len(self._dead)
        status = "ok" if alive == self.size else "degraded" if alive else "dead"
        return {"status": status, "data_parallel_size": self.size, "replicas_alive": alive, "replicas": replicas}

    def router_stats(self) -> dict[str, Any]:
        """Decision counts by reason, and each replica's state (for /metrics)."""
        with self._lock:
            return {
                "decisions": dict(self.router.decisions),
                "replicas": [
                    {"alive": state.alive, "requests": state.requests, "outstanding_tokens": state.outstanding_tokens,
                     "routed": state.routed}
                    for state in self.router.replicas
                ],
            }

    def shutdown(self) -> None:
        """Stop every replica (then the Ray placement, and Ray if it was started for the run)."""
        with self._lock:
            self._shutting_down = True
        try:
            self.replica_set.shutdown()
        finally:
            if self.dead_error is None:
                self._mark_dead(EngineDeadError("the engine was shut down"))

    def close(self) -> None:
        for replica in self.replicas:
            replica.close()


def route_request(request: Request, block_size: int, max_model_len: int) -> RouteRequest:
    """What the router weighs: the prompt's images and video chunks by content hash (a video's is known once it
    is probed, before it is decoded) and its first KV blocks' chained hashes (the same hashes the replica's prefix
    cache computes)."""
    images = tuple(
        ImageRef(feature.mm_hash, feature.placeholder.offset, feature.num_tokens) for feature in request.mm_features
    )
    tokens = request.prompt_token_ids
    block_hashes, parent = [], None
    for index in range(min(len(tokens) // block_size, MAX_ROUTED_BLOCKS)):
        start, end = index * block_size, (index + 1) * block_size
        parent = hash_block(parent, tokens[start:end], block_extra_keys(request, start, end))
        block_hashes.append(parent)
    max_tokens = request.sampling_params.max_tokens
    max_new = max_tokens if max_tokens is not None else max(max_model_len - len(tokens), 1)
    return RouteRequest(request.request_id, len(tokens), max_new, images, tuple(block_hashes), block_size)


def _combined_info(replicas: list[MPClient], dp: DataParallelConfig) -> dict[str, Any]:
    first = replicas[0].info
    return {
        **first,
        "num_kv_blocks": sum(replica.info["num_kv_blocks"] for replica in replicas),
        "data_parallel": {
            "size": len(replicas),
            "backend": dp.data_parallel_backend,
            "router_policy": dp.router_policy,
            "replicas": [replica.info for replica in replicas],
        },
    }


def _combine(method: str, results: list[Any]) -> Any:
    if method == "has_unfinished_requests":
        return any(results)
    if method == "check_idle_integrity":
        return None  # each replica raised if it was not idle and clean
    if method == "kv_block_counts":
        return sum(free for free, _ in results), sum(total for _, total in results)
    if method in _SUMMED_COUNTERS:
        combined: dict[str, float] = defaultdict(float)
        for counters in results:
            for key, value in counters.items():
                combined[key] += value
        return dict(combined)
    return results
