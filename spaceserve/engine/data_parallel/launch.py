"""Starting the data-parallel replicas: where each runs and how, for both backends.

mp: local engine-core processes (core_client.MPClient), one GPU each through CUDA_VISIBLE_DEVICES, taken in turn
from the GPUs the front sees; more replicas than GPUs share them, which needs replicas-per-GPU x
gpu_memory_utilization <= 1. Replicas on different GPUs start at the same time; replicas sharing a GPU start one
after another, so each one's memory profile sees the ones before it as memory others hold, and
gpu_memory_utilization is each one's share (shared_gpu_config). On a CPU
every replica is a process on the CPU.

ray: Ray actors in a placement group (ray_replica.py).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from spaceserve.config import DataParallelConfig, EngineConfig
from spaceserve.core.errors import ConfigError
from spaceserve.engine.core_client import MPClient


@dataclass
class ReplicaSet:
    clients: list[MPClient]
    placements: list[dict[str, Any]]
    """Where each replica runs (device, pid; node for Ray), as /health shows it."""
    cleanup: Callable[[], None] | None = None
    """After the replicas stopped: release what placed them (a Ray placement group, a Ray instance)."""
    _stopped: bool = field(default=False, repr=False)

    def shutdown(self) -> None:
        """Stop every replica (at the same time), then clean up. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        threads = [threading.Thread(target=client.shutdown, daemon=True) for client in self.clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self.cleanup is not None:
            self.cleanup()


def start_replicas(config: EngineConfig, dp: DataParallelConfig) -> ReplicaSet:
    """`config` is each replica's own (data_parallel left at one engine)."""
    if dp.data_parallel_backend == "ray":
        from spaceserve.engine.data_parallel.ray_replica import start_ray_replicas

        return start_ray_replicas(config, dp)
    envs = mp_device_envs(config, dp.data_parallel_size)
    by_device: dict[str, list[int]] = {}
    for index, env in enumerate(envs):
        by_device.setdefault(env.get("CUDA_VISIBLE_DEVICES", f"cpu-{index}"), []).append(index)
    configs = [config] * len(envs)
    for group in by_device.values():
        for position, index in enumerate(group):
            configs[index] = shared_gpu_config(config, position)
    clients = start_concurrently(
        [lambda env=env, config=replica_config: MPClient(config, env=env, wait=False)
         for env, replica_config in zip(envs, configs)],
        list(by_device.values()),
    )
    placements = [
        {"backend": "mp", "device": f"cuda (GPU {env['CUDA_VISIBLE_DEVICES']})" if "CUDA_VISIBLE_DEVICES" in env else "cpu",
         "pid": client.process.pid}
        for env, client in zip(envs, clients)
    ]
    return ReplicaSet(clients, placements)


def mp_device_envs(
    config: EngineConfig, size: int, visible: str | None = None, device_count: int | None = None
) -> list[dict[str, str]]:
    """Each local replica's CUDA_VISIBLE_DEVICES; on a CPU, its share of the cores as OMP_NUM_THREADS (unless that
    is set already): replicas that each spin a thread per core run ~50x slower (measured on 2 cores). `visible`
    and `device_count` default to this process's CUDA_VISIBLE_DEVICES and torch's device count."""
    if not config.device.startswith("cuda"):
        if os.environ.get("OMP_NUM_THREADS"):
            return [{} for _ in range(size)]
        threads = str(max(1, (os.cpu_count() or 1) // size))
        return [{"OMP_NUM_THREADS": threads} for _ in range(size)]
    if config.device != "cuda":
        raise ConfigError(
            f"device {config.device!r} pins one GPU, but data-parallel replicas take one GPU each; pass --device cuda "
            "and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if visible is not None and visible.strip():
        gpus = [item.strip() for item in visible.split(",") if item.strip()]
    else:
        if device_count is None:
            import torch

            device_count = torch.cuda.device_count()
        gpus = [str(index) for index in range(device_count)]
    if not gpus:
        raise ConfigError("data parallelism on CUDA found no visible GPU")
    per_gpu = math.ceil(size / len(gpus))
    cache = config.cache
    sized_by_utilization = cache.kv_cache_memory_bytes is None and cache.num_gpu_blocks is None
    if per_gpu > 1 and sized_by_utilization and per_gpu * cache.gpu_memory_utilization > 1.0 + 1e-9:
        raise ConfigError(
            f"{size} replicas on {len(gpus)} GPU(s) put {per_gpu} on one GPU, each sized to gpu_memory_utilization "
            f"{cache.gpu_memory_utilization} of it; lower it to at most {math.floor(100 / per_gpu) / 100:.2f}"
        )
    return [{"CUDA_VISIBLE_DEVICES": gpus[index % len(gpus)]} for index in range(size)]


def shared_gpu_config(config: EngineConfig, position: int) -> EngineConfig:
    """The config of the replica started `position`-th on a GPU others already use. A replica sizes its KV cache to
    total x gpu_memory_utilization minus what others hold (memory_planner.py); the replicas before it hold their
    shares by then, so asking for (position + 1) shares leaves it its own one: gpu_memory_utilization is each
    replica's share of the GPU."""
    cache = config.cache
    if position == 0 or cache.kv_cache_memory_bytes is not None or cache.num_gpu_blocks is not None:
        return config
    utilization = min(cache.gpu_memory_utilization * (position + 1), 1.0)
    return replace(config, cache=replace(cache, gpu_memory_utilization=utilization))


def start_concurrently(factories: list[Callable[[], MPClient]], groups: list[list[int]]) -> list[MPClient]:
    """Start the replicas: each group's one after another, the groups at the same time. Everything is launched from
    this thread (a core process is told to stop when the thread that launched it ends). `factories[i]()` launches
    replica i without waiting for it. If any fails, the others are shut down and the failure of the
    lowest-numbered replica is raised."""
    clients: list[MPClient | None] = [None] * len(factories)
    errors: dict[int, BaseException] = {}
    for round_index in range(max(len(group) for group in groups)):
        launched = [group[round_index] for group in groups if round_index < len(group)]
        for index in launched:
            try:
                clients[index] = factories[index]()
            except BaseException as exc:  # noqa: BLE001 - raised below, after the others are stopped
                errors[index] = exc
        for index in launched:
            client = clients[index]
            if client is None:
                continue
            try:
                client.wait_until_ready()
            except BaseException as exc:  # noqa: BLE001 - as above
                errors[index] = exc
                clients[index] = None
        if errors:
            break
    if errors:
        for client in clients:
            if client is not None:
                client.shutdown()
                client.close()
        raise errors[min(errors)]
    return clients  # type: ignore[return-value]
