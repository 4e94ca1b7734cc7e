"""The Ray backend: each replica is a Ray actor placed by one placement group (a bundle per replica: one GPU and
one CPU, or one CPU on a CPU engine), on the cluster at --ray-address or on a local Ray instance started for the
run. Ray places and supervises the processes; the messages travel as in the mp backend, over two ZMQ sockets per
replica that the front binds on its node's address (TCP, since an actor may live on another host) and the actor
connects to, msgpack-framed by serial.py.

The actor runs the core process's own code (core_proc.serve_engine_core) in its process; Ray sets its
CUDA_VISIBLE_DEVICES to the GPU of its bundle. Actors are owned by the front, so Ray ends them when the front
ends. Every node needs this spaceserve importable and the model at the same path (a shared file system or the same
Hub cache); a local cluster's actors import the front's own spaceserve (its directory goes on their PYTHONPATH).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from spaceserve.child_pythonpath import child_pythonpath
from spaceserve.config import DataParallelConfig, EngineConfig
from spaceserve.core.errors import ConfigError
from spaceserve.engine.core_client import _SHUTDOWN_TIMEOUT_S, MPClient
from spaceserve.engine.data_parallel.launch import ReplicaSet, start_concurrently

logger = logging.getLogger(__name__)
PLACEMENT_TIMEOUT_S = 120.0


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("data_parallel_backend='ray' needs Ray: pip install -e '.[ray]'") from None
    return ray


class EngineCoreActor:
    """What runs in each replica's actor (made a Ray actor class by `ray.remote` at launch, so importing this module
    does not need Ray)."""

    def where(self) -> dict[str, Any]:
        import ray

        return {"node": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", "")}

    def run(self, config: EngineConfig, input_address: str, output_address: str, log_level: int) -> None:
        """Serve until the front sends Shutdown (this call returns then) or the core fails."""
        from spaceserve.engine.core_proc import serve_engine_core

        logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [engine-core] %(name)s: %(message)s")
        serve_engine_core(config, input_address, output_address)


class RayCluster:
    """The Ray instance (joined, or started for the run) and the placement group of the replicas."""

    def __init__(self, dp: DataParallelConfig, use_gpu: bool) -> None:
        ray = import_ray()
        from ray.util.placement_group import placement_group

        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            # "local" always starts a new instance (never another user's cluster found on this machine)
            ray.init(address=dp.ray_address or "local", include_dashboard=False, logging_level=logging.WARNING)
        size = dp.data_parallel_size
        self.bundle = {"GPU": 1.0, "CPU": 1.0} if use_gpu else {"CPU": 1.0}
        available = ray.cluster_resources()
        short = {name: amount * size for name, amount in self.bundle.items() if available.get(name, 0.0) < amount * size}
        if short:
            self.shutdown()
            have = ", ".join(f"{available.get(name, 0.0):g} {name}" for name in short)
            raise ConfigError(
                f"{size} replicas need {', '.join(f'{need:g} {name}' for name, need in short.items())} on the Ray "
                f"cluster, which has {have}"
            )
        self.placement_group = placement_group([dict(self.bundle) for _ in range(size)], strategy="PACK")
        ready, _ = ray.wait([self.placement_group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            self.shutdown()
            raise ConfigError(f"Ray could not place {size} bundles of {self.bundle} within {PLACEMENT_TIMEOUT_S:g} s")

    def shutdown(self) -> None:
        ray = import_ray()
        from ray.util.placement_group import remove_placement_group

        group = getattr(self, "placement_group", None)
        if group is not None and ray.is_initialized():
            try:
                remove_placement_group(group)
            except Exception:  # noqa: BLE001 - the cluster may be gone already
                logger.warning("removing the replicas' placement group failed", exc_info=True)
            self.placement_group = None
        if self.started_ray and ray.is_initialized():
            ray.shutdown()


class RayReplicaClient(MPClient):
    """A replica in a Ray actor: MPClient's transport over TCP, with the actor's life in place of a process's."""

    def __init__(self, config: EngineConfig, cluster: RayCluster, bundle_index: int) -> None:
        self._cluster = cluster
        self._bundle_index = bundle_index
        self.actor = None
        self.location: dict[str, Any] = {}
        self._run = None
        super().__init__(config, wait=False)

    def _bind(self) -> tuple[str, str]:
        ray = import_ray()
        host = ray.util.get_node_ip_address()
        input_port = self._input.bind_to_random_port(f"tcp://{host}")
        output_port = self._output.bind_to_random_port(f"tcp://{host}")
        return f"tcp://{host}:{input_port}", f"tcp://{host}:{output_port}"

    def _launch(self, config: EngineConfig, input_address: str, output_address: str, env: dict[str, str]) -> None:
        ray = import_ray()
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pythonpath = child_pythonpath(os.environ.get("PYTHONPATH"))
        bundle = self._cluster.bundle
        actor_class = ray.remote(EngineCoreActor)
        self.actor = actor_class.options(
            num_cpus=bundle.get("CPU", 0.0),
            num_gpus=bundle.get("GPU", 0.0),
            max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self._cluster.placement_group, placement_group_bundle_index=self._bundle_index
            ),
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath, **env}},
        ).remote()
        self._where = self.actor.where.remote()
        log_level = logging.getLogger().getEffectiveLevel()
        self._run = self.actor.run.remote(config, input_address, output_address, log_level)

    def wait_until_ready(self) -> None:
        try:
            self.location = import_ray().get(self._where)
        except Exception:
            pass  # the actor failed to start: the wait below reports why
        super().wait_until_ready()

    def _exit_reason(self) -> str | None:
        if self._run is None:
            return "the engine core actor was never started"
        ray = import_ray()
        ready, _ = ray.wait([self._run], timeout=0)
        if not ready:
            return None
        try:
            ray.get(self._run)
        except Exception as exc:  # noqa: BLE001 - Ray's account of the actor's death
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return f"the engine core actor died ({type(exc).__name__}: {first_line})"
        return "the engine core actor stopped"

    def _stop(self) -> None:
        ray = import_ray()
        if self._run is not None:
            ray.wait([self._run], timeout=_SHUTDOWN_TIMEOUT_S)
        if self.actor is not None and ray.is_initialized():
            ray.kill(self.actor)


def start_ray_replicas(config: EngineConfig, dp: DataParallelConfig) -> ReplicaSet:
    cluster = RayCluster(dp, use_gpu=config.device.startswith("cuda"))
    size = dp.data_parallel_size
    try:
        clients = start_concurrently(
            [lambda index=index: RayReplicaClient(config, cluster, index) for index in range(size)],
            [[index] for index in range(size)],
        )
    except BaseException:
        cluster.shutdown()
        raise
    placements = [{"backend": "ray", **client.location} for client in clients]
    return ReplicaSet(clients, placements, cleanup=cluster.shutdown)
