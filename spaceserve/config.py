"""Engine settings as frozen dataclasses; `EngineConfig` bundles them with the resolved model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from spaceserve.core.errors import ConfigError
from spaceserve.models.config import ImageProcessorConfig, ModelConfig

EncoderPolicy = Literal["fcfs", "twsrft"]
MultiplexMode = Literal["time", "streams", "space", "mps", "auto"]
MULTIPLEX_MODES: tuple[str, ...] = ("time", "streams", "space", "mps", "auto")
ENCODER_PROCESS_MODES: tuple[str, ...] = ("streams", "space", "mps")
"""The modes whose encoder can run in a process of its own (mps always does)."""
DATA_PARALLEL_BACKENDS: tuple[str, ...] = ("mp", "ray")
ROUTER_POLICIES: tuple[str, ...] = ("cache_aware", "least_loaded", "round_robin")
MM_ENCODER_TP_MODES: tuple[str, ...] = ("weights", "data")
EXECUTOR_BACKENDS: tuple[str, ...] = ("uni", "mp")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    num_gpu_blocks: int | None = None
    """Fixes the number of KV blocks; otherwise sized from memory (gpu_memory_utilization or kv_cache_memory_bytes)."""
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    """The KV cache gets this many bytes on any device (gpu_memory_utilization is then ignored). Default on CPU:
    1 GiB, capped at what max_num_seqs x max_model_len need."""

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks < 1:
            raise ConfigError(f"num_gpu_blocks must be >= 1, got {self.num_gpu_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    max_model_len: int = 4096
    async_scheduling: bool = True
    """Schedule and launch step N+1 while step N runs (sampled ids fed to the next step on the device); outputs
    are identical either way."""

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1 or self.max_model_len < 1:
            raise ConfigError("max_num_batched_tokens, max_num_seqs and max_model_len must be >= 1")


@dataclass(frozen=True)
class EncoderConfig:
    policy: EncoderPolicy = "fcfs"
    window_s: float = 0.05
    """twsrft: requests arriving within one window of this length are ordered by remaining patches."""
    budget_tokens: int = 8192
    """Encoder output tokens per batch; a single larger item still runs, alone."""
    cache_tokens: int = 16384
    """Capacity of the encoder cache in embedding rows; an image needing more is rejected."""

    def __post_init__(self) -> None:
        if self.policy not in ("fcfs", "twsrft"):
            raise ConfigError(f"encoder policy must be 'fcfs' or 'twsrft', got {self.policy!r}")
        if self.window_s < 0 or self.budget_tokens < 1 or self.cache_tokens < 1:
            raise ConfigError("encoder window_s must be >= 0 and budget_tokens, cache_tokens >= 1")


@dataclass(frozen=True)
class VideoConfig:
    max_duration_s: float = 3600.0
    """Longer videos are rejected when the request arrives."""
    decode_workers: int = 4
    """Threads of the decode stage (each runs one video's decode + sampling + preprocessing at a time)."""
    decode_backend: str = "auto"
    cache_bytes: int = 1 << 30
    """Capacity of the cache of processed videos (on the engine's device), least recently used evicted."""
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    """Server-wide mm_processor_kwargs (fps, num_frames, min_frames, max_frames, min_pixels, max_pixels,
    max_video_tokens); a request's own mm_processor_kwargs override them."""
    decoder_sessions_per_gpu: int = 8
    """NVDEC sessions per decoding GPU (FlashCodec): each video takes as many as its length gives work for and are
    free, splitting it along GOP boundaries; the sessions are opened and warmed when the engine starts and live as
    long as it. 0: no decoder pool, each video is decoded by one session."""
    decoder_cpu_sessions: int | None = None
    """PyAV sessions (one thread each) for GOP-parallel decoding on the CPU; None: one per core."""
    decode_gpus: tuple[int, ...] | None = None
    """CUDA devices whose decoders take part (frames are copied to the engine's device); None: the engine's GPU."""
    chunk_tokens: int = 1024
    """Videos are encoded and prefilled in chunks of whole temporal patches, each as soon as its frames are decoded:
    the first chunk is one temporal patch, each next twice the one before, up to this many tokens. 0: one chunk
    per video (encoded once the whole video is decoded)."""

    def __post_init__(self) -> None:
        if self.chunk_tokens < 0:
            raise ConfigError(f"video chunk_tokens must be >= 0, got {self.chunk_tokens}")
        if self.max_duration_s <= 0 or self.decode_workers < 1 or self.cache_bytes < 0:
            raise ConfigError("video max_duration_s must be > 0, decode_workers >= 1 and cache_bytes >= 0")
        if self.decoder_sessions_per_gpu < 0:
            raise ConfigError(f"video decoder sessions per GPU must be >= 0, got {self.decoder_sessions_per_gpu}")
        if self.decoder_cpu_sessions is not None and self.decoder_cpu_sessions < 1:
            raise ConfigError(f"video decoder CPU sessions must be >= 1, got {self.decoder_cpu_sessions}")
        gpus = self.decode_gpus
        if gpus is not None and (not gpus or min(gpus) < 0 or len(set(gpus)) != len(gpus)):
            raise ConfigError(f"video decode GPUs must be distinct CUDA device indices, got {gpus}")


@dataclass(frozen=True)
class AllocationConfig:
    """space: what the SM allocator (sched/allocator.py) chooses splits from, and the SLOs it keeps."""

    sm_curves: str | None = None
    """A `spaceserve profile` JSON with this device's and model's curves; None: a small grid is profiled at
    start-up."""
    slo_tpot_ms: float = 50.0
    """Time per output token the allocator keeps running decodes within."""
    slo_ttft_ms: float = 2000.0
    """Time to first token past which a queued request counts as a miss."""
    startup_profile_s: float = 60.0
    """Most seconds the start-up profile may take (without sm_curves)."""
    enable_prefill_split: bool = False
    """Let the allocator run prefill steps on the encoder's side of a split while decode-only steps run on the
    other side (engine/prefill_lane.py); one process, one rank."""

    def __post_init__(self) -> None:
        if not (self.slo_tpot_ms > 0 and self.slo_ttft_ms > 0):
            raise ConfigError(f"SLOs must be > 0 ms, got tpot {self.slo_tpot_ms} and ttft {self.slo_ttft_ms}")
        if self.startup_profile_s <= 0:
            raise ConfigError(f"startup_profile_s must be > 0, got {self.startup_profile_s}")


@dataclass(frozen=True)
class DataParallelConfig:
    """Engine-core replicas behind one front (engine/data_parallel/): each a whole engine with its own KV cache and
    encoder cache, on a GPU of its own (or a share of one), the front routing every request to one of them."""

    data_parallel_size: int = 1
    data_parallel_backend: str = "mp"
    """mp: the replicas are local processes; ray: Ray actors placed by a placement group (one bundle each) on the
    cluster at ray_address, or on a local Ray instance started for the run."""
    ray_address: str | None = None
    router_policy: str = "cache_aware"
    """cache_aware: the replica that already holds the request's images or prompt prefix, unless that would
    overload it; least_loaded: the fewest outstanding tokens; round_robin: in turn."""

    def __post_init__(self) -> None:
        if self.data_parallel_size < 1:
            raise ConfigError(f"data_parallel_size must be >= 1, got {self.data_parallel_size}")
        if self.data_parallel_backend not in DATA_PARALLEL_BACKENDS:
            raise ConfigError(
                f"data_parallel_backend must be one of {', '.join(DATA_PARALLEL_BACKENDS)}, got "
                f"{self.data_parallel_backend!r}"
            )
        if self.router_policy not in ROUTER_POLICIES:
            raise ConfigError(f"router_policy must be one of {', '.join(ROUTER_POLICIES)}, got {self.router_policy!r}")
        if self.ray_address is not None and self.data_parallel_backend != "ray":
            raise ConfigError("ray_address needs data_parallel_backend='ray'")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    """Ranks the language model is split across (one GPU each): attention heads, MLP columns and the vocabulary."""
    mm_encoder_tp_mode: str = "weights"
    """weights: the vision tower is split across the ranks like the LM; data: each rank holds the whole tower and
    encodes a share of every batch's items, and the embeddings are all-gathered."""
    distributed_executor_backend: str | None = None
    """uni: the model runs in the engine's process (tensor_parallel_size 1 only); mp: one process per rank beyond
    rank 0, steps broadcast to them (runtime/executor.py). None: uni at size 1, mp above."""
    collective_timeout_s: float = 600.0
    """How long a rank waits in a collective or for a step message before the engine is declared dead."""

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.mm_encoder_tp_mode not in MM_ENCODER_TP_MODES:
            raise ConfigError(f"mm_encoder_tp_mode must be 'weights' or 'data', got {self.mm_encoder_tp_mode!r}")
        backend = self.distributed_executor_backend
        if backend is not None and backend not in EXECUTOR_BACKENDS:
            raise ConfigError(f"distributed_executor_backend must be 'uni' or 'mp', got {backend!r}")
        if backend == "uni" and self.tensor_parallel_size > 1:
            raise ConfigError(
                f"distributed_executor_backend 'uni' runs one rank, but tensor_parallel_size is "
                f"{self.tensor_parallel_size}; use 'mp'"
            )
        if self.collective_timeout_s <= 0:
            raise ConfigError(f"collective_timeout_s must be > 0, got {self.collective_timeout_s}")

    @property
    def executor_backend(self) -> str:
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "uni" if self.tensor_parallel_size == 1 else "mp"


def check_tensor_parallel(model_config: ModelConfig, parallel: ParallelConfig) -> None:
    """Raise ConfigError naming the first model dimension the tensor-parallel size cannot split."""
    tp = parallel.tensor_parallel_size
    if tp == 1:
        return
    text = model_config.text
    if text.num_attention_heads % tp:
        raise ConfigError(
            f"tensor_parallel_size {tp} does not divide the language model's {text.num_attention_heads} attention heads"
        )
    kv = text.num_key_value_heads
    if kv % tp and tp % kv:
        raise ConfigError(
            f"tensor_parallel_size {tp} neither divides the {kv} key/value heads nor is a multiple of them "
            "(fewer KV heads than ranks are replicated, which needs an even spread)"
        )
    if text.intermediate_size % tp:
        raise ConfigError(f"tensor_parallel_size {tp} does not divide the MLP's intermediate size {text.intermediate_size}")
    if parallel.mm_encoder_tp_mode == "weights":
        vision = model_config.vision
        for what, size in (("attention heads", vision.num_heads), ("MLP intermediate size", vision.intermediate_size)):
            if size % tp:
                raise ConfigError(
                    f"tensor_parallel_size {tp} does not divide the vision tower's {what} ({size}); "
                    "use mm_encoder_tp_mode='data' (each rank encodes whole images)"
                )


@dataclass(frozen=True)
class EngineConfig:
    model: str
    model_config: ModelConfig
    image_config: ImageProcessorConfig
    model_dir: str | None
    load_format: Literal["auto", "dummy"] = "auto"
    dtype: str = "auto"
    device: str = "cpu"
    seed: int = 0
    tokenizer: str | None = None
    """A tokenizer directory used instead of the model directory's."""
    skip_tokenizer_init: bool = False
    """No tokenizer: prompts are token ids, outputs carry no text (a checkpoint without tokenizer files)."""
    multiplex: MultiplexMode = "time"
    """time: the encoder runs inside the engine step on the whole device (vLLM v1); streams: concurrently, on a
    CUDA stream of its own with no SM fence (on CPU: a worker thread); space: concurrently, on a disjoint SM
    partition (green contexts); mps: concurrently, in a process of its own under an NVIDIA MPS daemon, each process
    capped by an active-thread percentage (the SpaceServe paper's baseline); auto: space where green contexts work,
    otherwise time."""
    encoder_process: bool = False
    """Run the vision encoder in a process of its own (one per GPU; embeddings come back through CUDA IPC, or shared
    memory on the CPU). mps always does; streams and space may (on a GPU, under an MPS daemon)."""
    encoder_mps_percentage: int | None = None
    """mps: the encoder process's CUDA_MPS_ACTIVE_THREAD_PERCENTAGE; None: runtime/mps.py's default."""
    lm_mps_percentage: int | None = None
    """mps: the engine-core (LM) process's; None: 100 minus the encoder's."""
    encoder_sms: tuple[int, ...] = ()
    """space: the SM splits to choose from, as SMs given to the encoder while it has work (each rounded up to the
    device's granularity). The smallest is used while the LM is busy, the largest while it runs few sequences;
    empty: about 36% and 73% of the device."""
    limit_mm_per_prompt: dict[str, int] = field(default_factory=lambda: {"image": 16})
    core_preprocess_min_pixels: int | None = None
    """Images of at least this many pixels are resized, normalised and patchified by the engine core on its device
    (just before they are encoded), the front sending their uint8 pixels; None: every image in the front."""
    attention_backend: str = "auto"
    """auto: triton on CUDA, the torch reference elsewhere."""
    enforce_eager: bool = False
    """Never replay CUDA graphs: neither decode steps nor the vision encoder."""
    cuda_graph_sizes: tuple[int, ...] | None = None
    """Decode batch sizes captured as CUDA graphs; None: a ladder up to max_num_seqs."""
    vision_cuda_graphs: bool = True
    """Run encoder batches as CUDA graphs over padded patch-count buckets (CUDA with Triton; off with enforce_eager)."""
    vision_cuda_graph_patches: tuple[int, ...] | None = None
    """The buckets, in patches (multiples of merge**2); None: a ladder up to encoder.budget_tokens x merge**2."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)


    data_parallel: DataParallelConfig = field(default_factory=DataParallelConfig)
    """Read by the front only: each replica's engine core gets the default (one engine)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor parallelism inside each engine core (runtime/executor.py)."""

    def __post_init__(self) -> None:
        check_tensor_parallel(self.model_config, self.parallel)
        if self.multiplex not in MULTIPLEX_MODES:
            raise ConfigError(f"multiplex must be one of {', '.join(MULTIPLEX_MODES)}, got {self.multiplex!r}")
        if any(count < 1 for count in self.encoder_sms):
            raise ConfigError(f"encoder_sms must be >= 1, got {self.encoder_sms}")
        if self.multiplex == "mps" and not self.encoder_process:
            raise ConfigError("multiplex 'mps' runs the encoder in a process of its own: set encoder_process")
        if self.encoder_process and self.parallel.tensor_parallel_size > 1:
            raise ConfigError(
                "encoder_process (and multiplex 'mps') runs one encoder process for one GPU; with "
                f"tensor_parallel_size={self.parallel.tensor_parallel_size} the ranks encode in their own processes"
            )
        if self.encoder_process and self.multiplex not in ENCODER_PROCESS_MODES:
            raise ConfigError(
                f"encoder_process needs a concurrent mode ({', '.join(ENCODER_PROCESS_MODES)}), got multiplex "
                f"{self.multiplex!r}: time runs the encoder inside the engine step, and auto must be resolved first"
            )
        if self.allocation.enable_prefill_split and (self.encoder_process or self.parallel.tensor_parallel_size > 1):
            raise ConfigError("enable_prefill_split runs prefill steps on the encoder's SMs from the engine's process, "
                              "on one rank: not with encoder_process or tensor_parallel_size > 1")
        for name in ("encoder_mps_percentage", "lm_mps_percentage"):
            value = getattr(self, name)
            if value is None:
                continue
            if self.multiplex != "mps":
                raise ConfigError(
                    f"{name} applies to multiplex 'mps' only (space fences the processes with green contexts), got "
                    f"multiplex {self.multiplex!r}"
                )
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
                raise ConfigError(f"{name} must be a whole percentage in 1..100, got {value!r}")
