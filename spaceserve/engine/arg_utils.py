"""EngineArgs: every user-facing engine setting in one frozen dataclass, shared by LLM, AsyncLLM and the CLI.

`create_engine_config` resolves the model (directory, Hub cache or preset) and turns the flat arguments into the
nested frozen configs the engine reads. The CLI flags are generated from the fields (`cli_field` metadata: help,
type, choices), as vLLM's EngineArgs does, so a default is written once: `add_cli_args` / `from_cli_args` give
`spaceserve generate|serve|bench` the same flags with the same defaults, each with its help line and default.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, fields
from typing import Any

import torch

from spaceserve.config import (
    DATA_PARALLEL_BACKENDS,
    EXECUTOR_BACKENDS,
    MM_ENCODER_TP_MODES,
    MULTIPLEX_MODES,
    ROUTER_POLICIES,
    AllocationConfig,
    CacheConfig,
    DataParallelConfig,
    EncoderConfig,
    EngineConfig,
    ParallelConfig,
    SchedulerConfig,
    VideoConfig,
)
from spaceserve.core.errors import ConfigError
from spaceserve.engine.cli_fields import add_dataclass_args, cli_field, int_tuple, json_dict, parse_limits
from spaceserve.models.resolve import TINY_PRESETS, resolve_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineArgs:
    model: str
    load_format: str = cli_field("auto", "auto: the model's weights; dummy: random weights", choices=["auto", "dummy"])
    dtype: str = cli_field("auto", "weights and activations dtype: auto (the checkpoint's), float32, bfloat16, float16")
    device: str | None = cli_field(None, "cuda or cpu (default: cuda when this build and machine have it)")
    seed: int = cli_field(0, "seeds dummy weights and unseeded sampling")
    tokenizer: str | None = cli_field(None, "a tokenizer directory (tokenizer.json) to use instead of the model's")
    skip_tokenizer_init: bool = cli_field(
        False, "load no tokenizer: prompts must be token ids, outputs carry token ids and no text"
    )
    trust_remote_code: bool = cli_field(
        False, "accepted for vLLM compatibility; spaceserve runs no code from checkpoints, so it changes nothing"
    )
    max_model_len: int | None = cli_field(None, "context length (default: the model's max_position_embeddings)")
    max_num_batched_tokens: int = cli_field(8192, "tokens per engine step (chunked prefill)")
    max_num_seqs: int = cli_field(256, "sequences per engine step")
    async_scheduling: bool = cli_field(
        True, "schedule step N+1 while step N runs on the device (outputs are identical either way)"
    )
    block_size: int = cli_field(16, "tokens per KV-cache block")
    enable_prefix_caching: bool = cli_field(True, "reuse KV blocks of shared prompt prefixes (image-aware)")
    num_gpu_blocks_override: int | None = cli_field(None, "fix the number of KV blocks instead of sizing from memory")
    gpu_memory_utilization: float = cli_field(0.9, "share of the GPU's memory the engine may use")
    kv_cache_memory_bytes: int | None = cli_field(
        None, "KV cache size in bytes; overrides --gpu-memory-utilization (CPU default: 1 GiB, capped by need)"
    )
    limit_mm_per_prompt: dict[str, int] | None = cli_field(
        None, 'most items of each modality per prompt: image=4,video=1 or {"image": 4, "video": 1} (default: '
        "image=16, video=999)", hash=False, type=parse_limits,
    )
    encoder_policy: str = cli_field("fcfs", "encoder queue order", choices=["fcfs", "twsrft"])
    encoder_window_s: float = cli_field(0.05, "twsrft: the window within which shorter encodes go first")
    encoder_budget_tokens: int | None = cli_field(
        None, "encoder output tokens per batch (default: the larger of --max-num-batched-tokens and the largest image)"
    )
    encoder_cache_tokens: int | None = cli_field(
        None, "encoder cache capacity in embedding rows (default: as --encoder-budget-tokens)"
    )
    multiplex: str = cli_field(
        "time", "time: encoder inside the engine step (vLLM v1); streams: concurrent on its own CUDA stream; "
        "space: concurrent on a disjoint SM partition (green contexts); auto: space where possible, else time",
        choices=list(MULTIPLEX_MODES),
    )
    encoder_sms: str | int | tuple[int, ...] | None = cli_field(
        None, "space: the splits the SM allocator chooses from, as SMs for the encoder, e.g. 32,64,96 (a split per "
        "count, rounded to the device's granularity; default: ~25%%, ~50%% and ~75%% of the SMs)", type=str,
    )
    sm_curves: str | None = cli_field(
        None, "space: resource-utility curves written by `spaceserve profile` (default: profile a small grid at "
        "start-up)"
    )
    slo_tpot_ms: float = cli_field(AllocationConfig.slo_tpot_ms, "TPOT the SM allocator keeps decodes within")
    slo_ttft_ms: float = cli_field(AllocationConfig.slo_ttft_ms, "TTFT the SM allocator aims for")
    enable_prefill_split: bool = cli_field(
        False, "space: let the SM allocator run prefill steps on the encoder's side of a split, beside decode-only "
        "steps on the other side (SGLang's PD multiplexing with the encoder on the prefill side)"
    )
    encoder_process: bool = cli_field(
        False, "streams/space: run the vision encoder in a process of its own (on a GPU: under an MPS daemon, see "
        "scripts/mps_daemon.sh); mps always does"
    )
    encoder_mps_percentage: int | None = cli_field(
        None, "mps: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE of the encoder process (default 36)"
    )
    lm_mps_percentage: int | None = cli_field(
        None, "mps: that of the LM (engine-core) process (default: 100 minus the encoder's)"
    )
    attention_backend: str = cli_field(
        "auto", "auto: triton on CUDA, the torch reference elsewhere", choices=["auto", "torch", "triton"]
    )
    enforce_eager: bool = cli_field(False, "no CUDA graphs: neither decode steps nor the vision encoder")
    cuda_graph_sizes: tuple[int, ...] | None = cli_field(
        None, "decode batch sizes to capture, e.g. 1,2,4,8,16 (default: a ladder up to --max-num-seqs)", type=int_tuple
    )
    disable_vision_cuda_graphs: bool = cli_field(False, "run the vision encoder eagerly (decode graphs stay on)")
    vision_cuda_graph_patches: tuple[int, ...] | None = cli_field(
        None, "patch-count buckets captured as vision CUDA graphs, e.g. 1024,4096,16384 (default: a ladder up to the "
        "encoder budget x merge**2)", type=int_tuple,
    )
    mm_processor_kwargs: dict[str, Any] | None = cli_field(
        None, 'server-wide image/video processing settings as JSON, e.g. \'{"fps": 1, "max_frames": 64}\' (fps, '
        "num_frames, min_frames, max_frames, min_pixels, max_pixels, max_video_tokens); they are also the limits of "
        "a request's own", hash=False, type=json_dict,
    )
    max_video_duration_s: float = cli_field(3600.0, "longer videos are refused when the request arrives")
    video_decode_workers: int = cli_field(4, "threads of the video decode stage")
    video_decode_backend: str = cli_field("auto", "auto, nvdec or pyav")
    video_cache_bytes: int = cli_field(1 << 30, "capacity of the processed-video cache")
    video_decoder_sessions: int = cli_field(
        8, "NVDEC sessions per GPU (opened at start); a video takes the free ones its length needs, split along GOP "
        "boundaries; 0: one session per video"
    )
    video_decoder_cpu_sessions: int | None = cli_field(
        None, "PyAV sessions for GOP-parallel decoding on the CPU (default: one per core)"
    )
    video_decode_gpus: str | tuple[int, ...] | None = cli_field(
        None, "GPUs whose NVDEC decoders take part: 'all' or indices like 0,1 (default: the engine's GPU)", type=str
    )
    gpu_preprocess_min_pixels: int | None = cli_field(
        None, "images of at least this many pixels are resized and normalised by the engine core on its device "
        "(default: all images when it runs on CUDA, none on CPU; 0: every image on any device)"
    )
    multiprocess: bool | None = cli_field(
        None, "run the engine core in a process of its own (default; --no-multiprocess: in this process, for "
        "debugging; or set SPACESERVE_ENABLE_MULTIPROCESSING=0)", action=argparse.BooleanOptionalAction,
    )
    video_chunk_tokens: int = cli_field(
        1024, "videos are encoded and prefilled chunk by chunk as they decode: the first chunk one temporal patch, "
        "each next twice the one before, up to this many tokens; 0: one chunk per video"
    )
    data_parallel_size: int = cli_field(
        1, "engine-core replicas behind one endpoint (one GPU each, or GPUs shared when replicas x "
        "gpu-memory-utilization <= 1)", aliases=("-dp",),
    )
    data_parallel_backend: str = cli_field(
        "mp", "mp: replicas are local processes; ray: Ray actors in a placement group (pip install -e '.[ray]')",
        choices=list(DATA_PARALLEL_BACKENDS),
    )
    ray_address: str | None = cli_field(
        None, "ray: the cluster to place replicas on (default: a local Ray instance started for the run)"
    )
    router_policy: str = cli_field(
        "cache_aware", "data parallel: which replica gets a request (cache_aware: the one holding its images or "
        "prefix, bounded by load; least_loaded; round_robin)", choices=list(ROUTER_POLICIES),
    )
    tensor_parallel_size: int = cli_field(
        1, "split the language model across this many GPUs of this host (heads, MLP, vocabulary)", aliases=("-tp",)
    )
    mm_encoder_tp_mode: str = cli_field(
        "weights", "with -tp > 1: weights splits the vision tower across the ranks too; data gives each rank the whole "
        "tower and a share of each batch's images (embeddings all-gathered)", choices=list(MM_ENCODER_TP_MODES),
    )
    distributed_executor_backend: str | None = cli_field(
        None, "uni: the model in this process (-tp 1); mp: one process per extra rank (default: uni at -tp 1)",
        choices=list(EXECUTOR_BACKENDS),
    )

    def create_engine_config(self) -> EngineConfig:
        resolved = resolve_model(self.model)
        load_format = self.load_format
        if load_format == "auto" and not resolved.has_weights:
            if resolved.name.split("/")[-1] not in TINY_PRESETS:
                raise ConfigError(
                    f"{self.model!r} has no weights here (no downloads); pass load_format='dummy' for random weights"
                )
            load_format = "dummy"  # the tiny presets exist to run without weights
        device = _resolve_device(self.device)
        if self.trust_remote_code:
            logger.info("trust_remote_code is accepted for vLLM compatibility and changes nothing: spaceserve runs "
                        "its own model code, never a checkpoint's")
        if self.tokenizer is not None and self.skip_tokenizer_init:
            raise ConfigError("tokenizer and skip_tokenizer_init exclude each other")
        max_model_len = self.max_model_len or resolved.model_config.text.max_position_embeddings
        parallel = ParallelConfig(
            tensor_parallel_size=self.tensor_parallel_size,
            mm_encoder_tp_mode=self.mm_encoder_tp_mode,
            distributed_executor_backend=self.distributed_executor_backend,
        )
        image = resolved.image_config
        largest_image_tokens = image.max_pixels // (image.factor**2)
        return EngineConfig(
            model=self.model,
            model_config=resolved.model_config,
            image_config=image,
            model_dir=str(resolved.directory),
            load_format=load_format,  # type: ignore[arg-type]
            dtype=self.dtype,
            device=device,
            tokenizer=self.tokenizer,
            skip_tokenizer_init=self.skip_tokenizer_init,
            seed=self.seed,
            multiplex=self.multiplex,  # type: ignore[arg-type]
            encoder_sms=_parse_sm_counts(self.encoder_sms),
            encoder_process=self.encoder_process or self.multiplex == "mps",
            encoder_mps_percentage=self.encoder_mps_percentage,
            lm_mps_percentage=self.lm_mps_percentage,
            limit_mm_per_prompt=dict(self.limit_mm_per_prompt or {"image": 16}),
            core_preprocess_min_pixels=self._core_preprocess_min_pixels(device),
            attention_backend=self.attention_backend,
            enforce_eager=self.enforce_eager,
            cuda_graph_sizes=self.cuda_graph_sizes,
            vision_cuda_graphs=not self.disable_vision_cuda_graphs,
            vision_cuda_graph_patches=self.vision_cuda_graph_patches,
            cache=CacheConfig(
                block_size=self.block_size,
                enable_prefix_caching=self.enable_prefix_caching,
                num_gpu_blocks=self.num_gpu_blocks_override,
                gpu_memory_utilization=self.gpu_memory_utilization,
                kv_cache_memory_bytes=self.kv_cache_memory_bytes,
            ),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=self.max_num_batched_tokens,
                max_num_seqs=self.max_num_seqs,
                max_model_len=max_model_len,
                async_scheduling=self.async_scheduling,
            ),
            video=VideoConfig(
                max_duration_s=self.max_video_duration_s,
                decode_workers=self.video_decode_workers,
                decode_backend=self.video_decode_backend,
                cache_bytes=self.video_cache_bytes,
                processor_kwargs=dict(self.mm_processor_kwargs or {}),
                decoder_sessions_per_gpu=self.video_decoder_sessions,
                decoder_cpu_sessions=self.video_decoder_cpu_sessions,
                decode_gpus=_resolve_decode_gpus(self.video_decode_gpus),
                chunk_tokens=self.video_chunk_tokens,
            ),
            allocation=AllocationConfig(
                sm_curves=_checked_curves_file(self.sm_curves),
                slo_tpot_ms=self.slo_tpot_ms,
                slo_ttft_ms=self.slo_ttft_ms,
                enable_prefill_split=self.enable_prefill_split,
            ),
            encoder=EncoderConfig(
                policy=self.encoder_policy,  # type: ignore[arg-type]
                window_s=self.encoder_window_s,
                budget_tokens=self.encoder_budget_tokens or max(self.max_num_batched_tokens, largest_image_tokens),
                cache_tokens=self.encoder_cache_tokens or max(self.max_num_batched_tokens, largest_image_tokens),
            ),
            data_parallel=DataParallelConfig(
                data_parallel_size=self.data_parallel_size,
                data_parallel_backend=self.data_parallel_backend,
                ray_address=self.ray_address,
                router_policy=self.router_policy,
            ),
            parallel=parallel,
        )

    def _core_preprocess_min_pixels(self, device: str) -> int | None:
        if self.gpu_preprocess_min_pixels is not None:
            if self.gpu_preprocess_min_pixels < 0:
                raise ConfigError(f"gpu_preprocess_min_pixels must be >= 0, got {self.gpu_preprocess_min_pixels}")
            return self.gpu_preprocess_min_pixels
        return 0 if torch.device(device).type == "cuda" else None

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model", help="a Hugging Face model directory, a Hub cache name, or a preset (tiny-qwen2-vl)")
        add_dataclass_args(parser.add_argument_group("engine"), EngineArgs)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def _checked_curves_file(path: str | None) -> str | None:
    """The path, once it reads as a curves file (which entry fits is known only on the device)."""
    if path is None:
        return None
    from spaceserve.sched.resource_curves import CurvesError, CurvesFile

    try:
        CurvesFile.read(path)
    except CurvesError as exc:
        raise ConfigError(f"--sm-curves: {exc}") from None
    return str(path)


def _resolve_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device must be cpu, cuda or cuda:N, got device={device!r}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        reason = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ConfigError(f"device={device!r} was asked for, but {reason}; use device='cpu'")
    if parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu, cuda or cuda:N, got device={device!r}")
    return device


def _parse_sm_counts(counts: str | int | tuple[int, ...] | None) -> tuple[int, ...]:
    if counts is None:
        return ()
    if isinstance(counts, int):
        return (counts,)
    if isinstance(counts, str):
        try:
            return tuple(int(item) for item in counts.split(",") if item.strip())
        except ValueError:
            raise ConfigError(f"encoder_sms must be SM counts like 48 or 48,96, got {counts!r}") from None
    return tuple(counts)


def _resolve_decode_gpus(gpus: str | tuple[int, ...] | None) -> tuple[int, ...] | None:
    """None, "all" (every visible GPU; none without CUDA) or indices as a tuple or "0,1" -> a tuple or None."""
    if gpus is None:
        return None
    if isinstance(gpus, str):
        if gpus.strip() == "all":
            return tuple(range(torch.cuda.device_count())) if torch.cuda.is_available() else None
        try:
            gpus = tuple(int(item) for item in gpus.split(","))
        except ValueError:
            raise ConfigError(f"video_decode_gpus must be 'all' or device indices like 0,1, got {gpus!r}") from None
    gpus = tuple(gpus)
    if torch.cuda.is_available() and gpus and max(gpus) >= torch.cuda.device_count():
        raise ConfigError(f"video_decode_gpus names {max(gpus)}, but only {torch.cuda.device_count()} GPUs are visible")
    return gpus
