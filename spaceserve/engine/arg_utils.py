"""EngineArgs: every user-facing engine setting in one frozen dataclass, shared by LLM, AsyncLLM and the CLI.

`create_engine_config` resolves the model (directory, Hub cache or preset) and turns the flat arguments into the
nested frozen configs the engine reads; `add_cli_args` / `from_cli_args` give `spaceserve generate|serve|bench` the
same flags with the same defaults.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, fields
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
from spaceserve.models.resolve import TINY_PRESETS, resolve_model


@dataclass(frozen=True)
class EngineArgs:
    model: str
    load_format: str = "auto"
    dtype: str = "auto"
    device: str | None = None
    seed: int = 0
    max_model_len: int | None = None
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    async_scheduling: bool = True
    block_size: int = 16
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    limit_mm_per_prompt: dict[str, int] | None = field(default=None, hash=False)
    encoder_policy: str = "fcfs"
    encoder_window_s: float = 0.05
    encoder_budget_tokens: int | None = None
    encoder_cache_tokens: int | None = None
    multiplex: str = "time"
    encoder_sms: str | int | tuple[int, ...] | None = None
    """space: SMs for the encoder, one count or several ("48,96": a split per count, chosen by LM load)."""
    sm_curves: str | None = None
    """space: resource-utility curves from `spaceserve profile` (default: a small grid profiled at start-up)."""
    slo_tpot_ms: float = 50.0
    slo_ttft_ms: float = 2000.0
    attention_backend: str = "auto"
    enforce_eager: bool = False
    cuda_graph_sizes: tuple[int, ...] | None = None
    disable_vision_cuda_graphs: bool = False
    vision_cuda_graph_patches: tuple[int, ...] | None = None
    mm_processor_kwargs: dict[str, Any] | None = field(default=None, hash=False)
    """Server-wide video sampling/processing settings (fps, num_frames, min_frames, max_frames, min_pixels,
    max_pixels, max_video_tokens); a request's own mm_processor_kwargs override them."""
    max_video_duration_s: float = 3600.0
    video_decode_workers: int = 4
    video_decode_backend: str = "auto"
    video_cache_bytes: int = 1 << 30
    video_decoder_sessions: int = 8
    """NVDEC sessions per decoding GPU for GOP-parallel decoding (FlashCodec); 0 decodes each video in one session."""
    video_decoder_cpu_sessions: int | None = None
    """PyAV sessions for GOP-parallel decoding on the CPU (default: one per core)."""
    video_decode_gpus: str | tuple[int, ...] | None = None
    """GPUs whose decoders take part: "all" or device indices (default: the engine's GPU)."""
    gpu_preprocess_min_pixels: int | None = None
    """Images of at least this many pixels are preprocessed by the engine core on its device (resize, normalise,
    patchify), not in the front. Default: every image when the engine runs on CUDA, none on CPU; set to apply on any
    device (0: every image)."""
    multiprocess: bool | None = None
    """Run the engine core in a process of its own (the default); False: in this process (tests, debugging).
    None reads SPACESERVE_ENABLE_MULTIPROCESSING (default 1)."""
    video_chunk_tokens: int = 1024
    """Largest chunk of a video encoded and prefilled while the rest decodes; 0: one chunk per video."""
    data_parallel_size: int = 1
    """Engine-core replicas behind the one front (AsyncLLM), each in a process of its own."""
    data_parallel_backend: str = "mp"
    ray_address: str | None = None
    router_policy: str = "cache_aware"
    tensor_parallel_size: int = 1
    """Split the language model across this many GPUs of this host (one process per rank beyond the first)."""
    mm_encoder_tp_mode: str = "weights"
    """weights: the vision tower is split across the ranks too; data: each rank encodes a share of the images."""
    distributed_executor_backend: str | None = None

    def create_engine_config(self) -> EngineConfig:
        resolved = resolve_model(self.model)
        load_format = self.load_format
        if load_format == "auto" and not resolved.has_weights:
            if resolved.name.split("/")[-1] not in TINY_PRESETS:
                raise ConfigError(
                    f"{self.model!r} has no weights here (no downloads); pass load_format='dummy' for random weights"
                )
            load_format = "dummy"  # the tiny presets exist to run without weights
        max_model_len = self.max_model_len or resolved.model_config.text.max_position_embeddings
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
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
            seed=self.seed,
            multiplex=self.multiplex,  # type: ignore[arg-type]
            encoder_sms=_parse_sm_counts(self.encoder_sms),
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
        parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
        parser.add_argument("--dtype", default="auto")
        parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--max-model-len", type=int, default=None)
        parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
        parser.add_argument("--max-num-seqs", type=int, default=256)
        parser.add_argument(
            "--async-scheduling",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="schedule step N+1 while step N runs on the device (outputs are identical either way)",
        )
        parser.add_argument("--block-size", type=int, default=16)
        parser.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
        parser.add_argument("--num-gpu-blocks-override", type=int, default=None)
        parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
        parser.add_argument("--kv-cache-memory-bytes", type=int, default=None, help="KV cache size; overrides the above")
        parser.add_argument(
            "--limit-mm-per-prompt",
            type=_parse_limits,
            default=None,
            help="most items of each modality per prompt, e.g. image=4,video=1",
        )
        parser.add_argument("--encoder-policy", default="fcfs", choices=["fcfs", "twsrft"])
        parser.add_argument("--encoder-window-s", type=float, default=0.05)
        parser.add_argument("--encoder-budget-tokens", type=int, default=None)
        parser.add_argument("--encoder-cache-tokens", type=int, default=None)
        parser.add_argument(
            "--multiplex",
            default="time",
            choices=list(MULTIPLEX_MODES),
            help="time: encoder inside the engine step (vLLM v1); streams: concurrent on its own CUDA stream; "
            "space: concurrent on a disjoint SM partition (green contexts); auto: space where possible, else time",
        )
        parser.add_argument(
            "--encoder-sms",
            default=None,
            help="space: SMs for the encoder, e.g. 48 or 48,96 (a split per count: the smallest while the LM is busy, "
            "the largest while it runs few sequences); rounded to the device's granularity",
        )
        parser.add_argument(
            "--gpu-preprocess-min-pixels",
            type=int,
            default=None,
            help="images of at least this many pixels are resized and normalised by the engine core on its device "
            "(default: all images when it runs on CUDA, none on CPU)",
        )
        parser.add_argument(
            "--multiprocess",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="run the engine core in a process of its own (default; --no-multiprocess: in this process, for "
            "debugging; or set SPACESERVE_ENABLE_MULTIPROCESSING=0)",
        )
        parser.add_argument(
            "--sm-curves",
            default=None,
            help="space: resource-utility curves written by `spaceserve profile` (default: profile a small grid at "
            "start-up)",
        )
        parser.add_argument(
            "--slo-tpot-ms", type=float, default=50.0, help="TPOT the SM allocator keeps decodes within"
        )
        parser.add_argument("--slo-ttft-ms", type=float, default=2000.0, help="TTFT the SM allocator aims for")
        parser.add_argument(
            "--data-parallel-size",
            "-dp",
            type=int,
            default=1,
            help="engine-core replicas behind one endpoint (one GPU each, or GPUs shared when "
            "replicas x gpu-memory-utilization <= 1)",
        )
        parser.add_argument(
            "--data-parallel-backend",
            default="mp",
            choices=list(DATA_PARALLEL_BACKENDS),
            help="mp: replicas are local processes; ray: Ray actors in a placement group (pip install -e '.[ray]')",
        )
        parser.add_argument(
            "--ray-address",
            default=None,
            help="ray: the cluster to place replicas on (default: a local Ray instance started for the run)",
        )
        parser.add_argument(
            "--router-policy",
            default="cache_aware",
            choices=list(ROUTER_POLICIES),
            help="data parallel: which replica gets a request (cache_aware: the one holding its images or prefix, "
            "bounded by load; least_loaded; round_robin)",
        )
        parser.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
        parser.add_argument(
            "--enforce-eager", action="store_true", help="no CUDA graphs: neither decode steps nor the vision encoder"
        )
        parser.add_argument(
            "--cuda-graph-sizes",
            type=lambda text: tuple(int(size) for size in text.split(",")),
            default=None,
            help="decode batch sizes to capture, e.g. 1,2,4,8,16 (default: a ladder up to max-num-seqs)",
        )
        parser.add_argument(
            "--disable-vision-cuda-graphs",
            action="store_true",
            help="run the vision encoder eagerly (decode graphs stay on)",
        )
        parser.add_argument(
            "--vision-cuda-graph-patches",
            type=lambda text: tuple(int(size) for size in text.split(",")),
            default=None,
            help="patch-count buckets captured as vision CUDA graphs, e.g. 1024,4096,16384 (default: a ladder up to "
            "the encoder budget x merge**2)",
        )

        parser.add_argument(
            "--mm-processor-kwargs",
            type=json.loads,
            default=None,
            help='video sampling/processing defaults as JSON, e.g. \'{"fps": 1, "max_frames": 64}\'',
        )
        parser.add_argument("--max-video-duration-s", type=float, default=3600.0)
        parser.add_argument("--video-decode-workers", type=int, default=4)
        parser.add_argument("--video-decode-backend", default="auto")
        parser.add_argument("--video-cache-bytes", type=int, default=1 << 30)
        parser.add_argument(
            "--video-decoder-sessions",
            type=int,
            default=8,
            help="NVDEC sessions per GPU (opened at start); a video takes the free ones its length needs, split along "
            "GOP boundaries; 0: one session per video",
        )
        parser.add_argument(
            "--video-decoder-cpu-sessions",
            type=int,
            default=None,
            help="PyAV sessions for GOP-parallel decoding on the CPU (default: one per core)",
        )
        parser.add_argument(
            "--video-decode-gpus",
            default=None,
            help="GPUs whose NVDEC decoders take part: 'all' or indices like 0,1 (default: the engine's GPU)",
        )
        parser.add_argument(
            "--video-chunk-tokens",
            type=int,
            default=1024,
            help="videos are encoded and prefilled chunk by chunk as they decode: the first chunk one temporal patch, "
            "each next twice the one before, up to this many tokens; 0: one chunk per video",
        )

        parser.add_argument(
            "--tensor-parallel-size",
            "-tp",
            type=int,
            default=1,
            help="split the language model across this many GPUs of this host (heads, MLP, vocabulary)",
        )
        parser.add_argument(
            "--mm-encoder-tp-mode",
            default="weights",
            choices=list(MM_ENCODER_TP_MODES),
            help="with -tp > 1: weights splits the vision tower across the ranks too; data gives each rank the "
            "whole tower and a share of each batch's images (embeddings all-gathered)",
        )
        parser.add_argument(
            "--distributed-executor-backend",
            default=None,
            choices=list(EXECUTOR_BACKENDS),
            help="uni: the model in this process (-tp 1); mp: one process per extra rank (default: uni at -tp 1)",
        )

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


def _parse_limits(text: str) -> dict[str, int]:
    limits = {}
    for item in text.split(","):
        modality, _, count = item.partition("=")
        if not count.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected modality=count pairs like image=4,video=1, got {text!r}")
        limits[modality.strip()] = int(count)
    return limits
