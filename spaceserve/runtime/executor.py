"""What the engine runs the model through: one rank in its own process, or several ranks of tensor parallelism.

Both executors give the engine the same things: `model`, `layout`, `memory_plan`, an `encoder_runner` with
EncoderRunner's `execute(batch)`, and a `model_runner` with ModelRunner's `launch(scheduled, encoder_outputs) ->
handle` / `collect(handle)` (plus `execute`, `release`, `use_stream`). The engine does not know which it has, nor
which process it is in.

- `UniprocExecutor`: today's direct path, the ModelRunner itself.
- `MultiprocExecutor` (multiproc_executor.py): rank 0 here, ranks 1..N-1 in processes it spawns, one GPU each; the
  same calls broadcast each step to the other ranks first.
"""

from __future__ import annotations

from pathlib import Path

import torch

from spaceserve.config import EngineConfig
from spaceserve.core.errors import ConfigError, SpaceServeError
from spaceserve.models.loader import build_model
from spaceserve.runtime.encoder_model import release_vision_tower
from spaceserve.runtime.encoder_process import ProcessEncoderWorker
from spaceserve.runtime.encoder_runner import EncoderRunner
from spaceserve.runtime.multiplex import ExecutionLayout, resolve_layout
from spaceserve.runtime.runner_setup import build_runners


class RankFailedError(SpaceServeError, RuntimeError):
    """A tensor-parallel rank died or stopped answering; the engine cannot run another step."""


def build_executor(config: EngineConfig, dtype: torch.dtype, device: torch.device):
    """UniprocExecutor or MultiprocExecutor (multiproc_executor.py), as config.parallel says."""
    if config.parallel.executor_backend == "uni":
        return UniprocExecutor(config, dtype, device)
    from spaceserve.runtime.multiproc_executor import MultiprocExecutor

    return MultiprocExecutor(config, dtype, device)


def model_directory(config: EngineConfig) -> Path | None:
    return None if config.model_dir is None else Path(config.model_dir)


def check_devices(config: EngineConfig) -> None:
    tp = config.parallel.tensor_parallel_size
    if torch.device(config.device).type == "cuda" and tp > torch.cuda.device_count():
        raise ConfigError(
            f"tensor_parallel_size {tp} needs {tp} GPUs, {torch.cuda.device_count()} are visible (one rank per GPU)"
        )


class UniprocExecutor:
    def __init__(self, config: EngineConfig, dtype: torch.dtype, device: torch.device) -> None:
        self.model = build_model(
            config.model_config,
            directory=model_directory(config),
            load_format=config.load_format,
            dtype=dtype,
            device=device,
            seed=config.seed,
        )
        # where the encoder and the LM run (streams, SM partitions); raises ConfigError if the mode cannot run here
        self.layout: ExecutionLayout = resolve_layout(config, device)
        self.encoder_worker = None
        if self.layout.encoder_process:  # the encoder process builds its own tower, started before the KV plan
            release_vision_tower(self.model)
            self.encoder_worker = ProcessEncoderWorker(config, self.layout, device, dtype)
        try:
            # profiles memory on CUDA, captures vision CUDA graphs (per encoder stream), sizes and allocates the KV
            # cache, captures decode CUDA graphs (per LM stream)
            self.model_runner, vision_graphs, self.memory_plan = build_runners(
                config, self.model, dtype, device, self.layout
            )
        except BaseException:
            if self.encoder_worker is not None:
                self.encoder_worker.shutdown()
            raise
        self.encoder_runner = None
        if self.encoder_worker is None:
            self.encoder_runner = EncoderRunner(self.model, device, config.image_config, vision_graphs)

    def describe(self) -> dict:
        return {"tensor_parallel_size": 1, "worker_pids": []}

    def check_health(self) -> None:
        pass

    def on_failure(self, callback) -> None:
        pass  # one process: nothing fails apart from it

    def shutdown(self) -> None:
        pass
