"""The measured sections of the GPU-path report (ceilings, decode, prefill, vision tower, KV planning), each over
engines built the way the engine core builds them, with targets from issue 4."""

from __future__ import annotations

import dataclasses
import functools
import gc
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.engine.core import EngineCore
from spaceserve.profile import floors
from spaceserve.profile.hardware import measure_copy_bandwidth, measure_matmul_tflops
from spaceserve.profile.synthetic import (
    DoesNotFit,
    check_sampled,
    decode_step,
    encoder_batch,
    fill_kv_caches_random,
    host_time_per_step,
    prefill_step,
    run_step,
    run_step_graphed,
)
from spaceserve.profile.timing import time_calls

DECODE_RATIO_TARGET, DECODE_RATIO_MIN_BATCH, CPU_SHARE_TARGET = 1.3, 16, 0.10
PREFILL_TARGET, VISION_TARGET, KV_PLAN_TOLERANCE = 0.60, 0.50, 0.05
GIB = float(1 << 30)


@dataclass(frozen=True)
class ReportSettings:
    device: str
    dtype: str
    attention_backend: str
    decode_models: tuple[str, ...]
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    big_model: str
    """Prefill, vision tower and KV planning run on this model."""
    prefill_cases: tuple[tuple[int, int], ...]
    """(new tokens, cached prefix tokens)."""
    vision_cases: tuple[tuple[str, tuple[tuple[int, int], ...]], ...]
    """(label, image sizes (height, width))."""
    decode_warmup: int = 5
    decode_iters: int = 50
    cpu_iters: int = 20
    warmup: int = 2
    iters: int = 6
    copy_bytes: int = 1 << 30
    matmul_n: int = 8192
    matmul_dtype: str = "bfloat16"
    gpu_memory_utilization: float = 0.9
    engine_overrides: dict[str, Any] = field(default_factory=dict, hash=False)


def gpu_settings() -> ReportSettings:
    return ReportSettings(
        device="cuda",
        dtype="bfloat16",
        attention_backend="triton",
        decode_models=("Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-7B-Instruct"),
        decode_batches=(1, 16, 64, 256),
        decode_contexts=(1024, 4096),
        big_model="Qwen/Qwen2-VL-7B-Instruct",
        prefill_cases=((8192, 0), (8192, 8192)),
        vision_cases=(("1x1344x1344", ((1344, 1344),)), ("8x448x448", ((448, 448),) * 8)),
    )


def smoke_settings() -> ReportSettings:
    """Every section on CPU with the tiny preset in seconds: proves the script, measures nothing worth keeping."""
    return ReportSettings(
        device="cpu",
        dtype="float32",
        attention_backend="torch",
        decode_models=("tiny-qwen2-vl",),
        decode_batches=(1, 3),
        decode_contexts=(40,),
        big_model="tiny-qwen2-vl",
        prefill_cases=((32, 0), (32, 32)),
        vision_cases=(("1x112x112", ((112, 112),)), ("2x56x84", ((56, 84),) * 2)),
        decode_warmup=1,
        decode_iters=2,
        cpu_iters=1,
        warmup=1,
        iters=1,
        copy_bytes=1 << 20,
        matmul_n=64,
        matmul_dtype="float32",
        engine_overrides={"kv_cache_memory_bytes": 1 << 22, "max_model_len": 128, "max_num_batched_tokens": 128},
    )


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class EngineHolder:
    """One engine at a time, reused by the sections that need the same model; the previous one is freed first
    (7B weights plus a 0.9-utilisation KV cache leave room for nothing else)."""

    def __init__(self, settings: ReportSettings) -> None:
        self.settings = settings
        self.model: str | None = None
        self.engine: EngineCore | None = None
        self.info: dict[str, Any] = {}

    def get(self, model: str) -> EngineCore:
        if self.model == model and self.engine is not None:
            return self.engine
        self.free()
        s = self.settings
        backend = _available_backend(s.attention_backend, s.device)
        args = EngineArgs(
            model=model,
            load_format="dummy",
            dtype=s.dtype,
            device=s.device,
            attention_backend=backend,
            max_num_seqs=max(s.decode_batches),
            cuda_graph_sizes=tuple(sorted(s.decode_batches)),
            gpu_memory_utilization=s.gpu_memory_utilization,
            **s.engine_overrides,
        )
        begin = time.perf_counter()
        self.engine = EngineCore(args.create_engine_config())
        self.model = model
        self.info = {
            "model": model,
            "build_s": round(time.perf_counter() - begin, 2),
            "attention_backend": backend,
            "engine_args": {k: v for k, v in dataclasses.asdict(args).items() if v is not None},
            "num_kv_blocks": self.engine.kv_manager.num_blocks,
            "kv_filled_bytes": fill_kv_caches_random(self.engine, seed=1234),
        }
        return self.engine

    def free(self) -> None:
        self.engine = None
        self.model = None
        free_device_memory()


def _available_backend(wanted: str, device: str) -> str:
    from spaceserve.layers.attention import get_attention_backend

    try:
        get_attention_backend(wanted, torch.device(device))
        return wanted
    except (ValueError, RuntimeError, ImportError):
        return "auto"


def _note_backend(section: dict, holder: EngineHolder) -> None:
    wanted = holder.settings.attention_backend
    used = holder.info.get("attention_backend")
    if used != wanted:
        section["notes"].append(f"attention backend {wanted!r} is not available here; ran {used!r}")
    section.setdefault("engines", []).append(dict(holder.info))


# ---- sections -------------------------------------------------------------------------------------------------


def run_ceilings(settings: ReportSettings, section: dict, context: dict) -> None:
    device = torch.device(settings.device)
    copy = measure_copy_bandwidth(device, settings.copy_bytes)
    matmul = measure_matmul_tflops(device, getattr(torch, settings.matmul_dtype), settings.matmul_n)
    context["bandwidth"], context["matmul_tflops"] = copy.best, matmul.best
    section["rows"] = [copy.to_dict(), matmul.to_dict()]
    section["notes"].append(
        f"copy {copy.best / 1e12:.3f} TB/s (median {copy.median / 1e12:.3f}); "
        f"matmul {matmul.best:.1f} TFLOP/s (median {matmul.median:.1f}); floors use the best figures"
    )


def run_decode(settings: ReportSettings, holder: EngineHolder, section: dict, context: dict) -> None:
    section["target"] = (
        f"step <= {DECODE_RATIO_TARGET}x floor at batch >= {DECODE_RATIO_MIN_BATCH}; CPU share < {CPU_SHARE_TARGET:.0%}"
    )
    device = torch.device(settings.device)
    bandwidth = context["bandwidth"]
    rng = np.random.default_rng(int(time.time()))
    for model in settings.decode_models:
        engine = holder.get(model)
        _note_backend(section, holder)
        text = engine.config.model_config.text
        dtype_bytes = torch.empty((), dtype=engine.dtype).element_size()
        runner = engine.model_runner
        for decode_context in settings.decode_contexts:
            for batch in settings.decode_batches:
                row: dict[str, Any] = {"model": model, "batch": batch, "context": decode_context}
                section["rows"].append(row)
                try:
                    step = decode_step(engine, batch, decode_context, rng)
                except DoesNotFit as exc:
                    row["skipped"] = f"does not fit: {exc}"
                    continue
                try:
                    output, row["graphed"] = run_step_graphed(runner, step.scheduled, engine.encoder_stage.embeddings)
                    check_sampled(output, step, text.vocab_size)
                    stats = time_calls(
                        lambda: run_step(runner, step.scheduled, engine.encoder_stage.embeddings),
                        device,
                        warmup=settings.decode_warmup,
                        iters=settings.decode_iters,
                    )
                    host = host_time_per_step(runner, step.scheduled, engine.encoder_stage.embeddings, device, settings.cpu_iters)
                except Exception as exc:  # one shape failing must not hide the others
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    continue
                finally:
                    step.release(engine)
                traffic = floors.uniform_decode_traffic(text, batch, decode_context, dtype_bytes)
                floor_ms = traffic.floor_seconds(bandwidth) * 1e3
                cpu_ms = float(np.median(host.samples_ms))
                ratio = stats.median_ms / floor_ms
                cpu_share = cpu_ms / stats.median_ms
                ratio_pass = ratio <= DECODE_RATIO_TARGET if batch >= DECODE_RATIO_MIN_BATCH else None
                cpu_pass = cpu_share < CPU_SHARE_TARGET if host.exact else None
                row.update(
                    step_ms=stats.median_ms,
                    step_p90_ms=stats.p90_ms,
                    step_min_ms=stats.min_ms,
                    floor_ms=floor_ms,
                    ratio=ratio,
                    weight_bytes=traffic.weight_bytes,
                    kv_read_bytes=traffic.kv_read_bytes,
                    kv_write_bytes=traffic.kv_write_bytes,
                    achieved_bytes_per_s=traffic.floor_bytes / (stats.median_ms * 1e-3),
                    cpu_ms=cpu_ms,
                    cpu_share=cpu_share,
                    cpu_method=host.method,
                    ratio_pass=ratio_pass,
                    cpu_pass=cpu_pass,
                )
                row["pass"] = _all_known(ratio_pass, cpu_pass)
                if not host.exact:
                    row["note"] = "CPU figure is an upper bound (runner has no launch/collect)"
        # drop our references before the holder builds the next model, or both engines' KV caches coexist
        engine = runner = None


def run_prefill(settings: ReportSettings, holder: EngineHolder, section: dict, context: dict) -> None:
    section["target"] = f">= {PREFILL_TARGET:.0%} of the measured matmul rate, counting the model's FLOPs"
    device = torch.device(settings.device)
    engine = holder.get(settings.big_model)
    _note_backend(section, holder)
    text = engine.config.model_config.text
    rng = np.random.default_rng(int(time.time()) + 1)
    for new, cached in settings.prefill_cases:
        row: dict[str, Any] = {"model": settings.big_model, "new_tokens": new, "cached_tokens": cached}
        section["rows"].append(row)
        try:
            step = prefill_step(engine, new, cached, rng)
        except DoesNotFit as exc:
            row["skipped"] = f"does not fit: {exc}"
            continue
        try:
            before = _reset_peak(device)
            check_sampled(run_step(engine.model_runner, step.scheduled, {}), step, text.vocab_size)
            if before is not None:
                row["peak_activation_bytes"] = torch.cuda.max_memory_allocated(device) - before
                context["prefill_peak_activation_bytes"] = max(
                    row["peak_activation_bytes"], context.get("prefill_peak_activation_bytes", 0)
                )
            stats = time_calls(
                lambda: run_step(engine.model_runner, step.scheduled, {}), device, warmup=settings.warmup, iters=settings.iters
            )
        finally:
            step.release(engine)
        flops = floors.prefill_flops(text, new, cached, num_sampled_rows=1)
        _rate_row(row, stats, flops.total, context["matmul_tflops"], PREFILL_TARGET)
        row.update(linear_flops=flops.linear, attention_flops=flops.attention, lm_head_flops=flops.lm_head)


def run_vision(settings: ReportSettings, holder: EngineHolder, section: dict, context: dict) -> None:
    section["target"] = f">= {VISION_TARGET:.0%} of the measured matmul rate"
    device = torch.device(settings.device)
    engine = holder.get(settings.big_model)
    model_config = engine.config.model_config
    rng = np.random.default_rng(int(time.time()) + 2)
    for label, sizes in settings.vision_cases:
        grids = [floors.image_grid(h, w, model_config.vision) for h, w in sizes]
        batch = encoder_batch(engine, grids, rng)
        path, call = "encoder_runner.execute", functools.partial(engine.encoder_stage.runner.execute, batch)
        with torch.inference_mode():
            stats = time_calls(call, device, warmup=settings.warmup, iters=settings.iters)
        flops = floors.vision_flops(model_config, grids)
        row: dict[str, Any] = {"model": settings.big_model, "case": label, "grids": grids, "path": path}
        row["patches"] = sum(t * h * w for t, h, w in grids)
        _rate_row(row, stats, flops.total, context["matmul_tflops"], VISION_TARGET)
        row.update(dataclasses.asdict(flops))
        section["rows"].append(row)
    free_device_memory()


def run_kv_plan(settings: ReportSettings, holder: EngineHolder, section: dict, context: dict) -> None:
    section["target"] = (
        f"KV bytes allocated within {KV_PLAN_TOLERANCE:.0%} of utilisation x total - weights - measured peak activations"
    )
    engine = holder.get(settings.big_model)
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    caches = getattr(engine.model_runner, "kv_caches", None) or []
    allocated = sum(c.numel() * c.element_size() for c in caches)
    row: dict[str, Any] = {
        "model": settings.big_model,
        "num_kv_blocks": engine.kv_manager.num_blocks,
        "weights_from_parameters_gib": weights / GIB,
        "kv_tensors_gib": allocated / GIB,
    }
    section["rows"].append(row)
    fields = dataclasses.asdict(engine.memory_plan)
    row["memory_plan"] = fields
    if fields.get("source") != "profiled":
        section["status_hint"] = "not profiled"
        row["note"] = f"KV sized by {fields.get('source')!r}, not profiled: the target applies to CUDA runs only"
        return
    total, utilization = fields["total_bytes"], fields["gpu_memory_utilization"]
    plan_weights, peak, kv_bytes = fields["weights_bytes"], fields["peak_activation_bytes"], fields["kv_cache_bytes"]
    deductions = {k: fields.get(k, 0) for k in ("non_torch_bytes", "cuda_graph_bytes", "encoder_cache_bytes")}
    expected = utilization * total - plan_weights - peak
    ratio = kv_bytes / expected if expected > 0 else float("nan")
    row.update(
        gpu_memory_utilization=utilization,
        total_gib=total / GIB,
        weights_gib=plan_weights / GIB,
        peak_activation_gib=peak / GIB,
        other_gib=sum(deductions.values()) / GIB,
        other_reserved=deductions,
        expected_kv_gib=expected / GIB,
        kv_cache_gib=kv_bytes / GIB,
        ratio=ratio,
        ratio_to_plan_budget=kv_bytes / (expected - sum(deductions.values())),
    )
    row["pass"] = abs(ratio - 1.0) <= KV_PLAN_TOLERANCE
    if caches and kv_bytes != allocated:
        section["notes"].append(f"the plan says {kv_bytes} KV bytes, the runner's tensors hold {allocated}")
    if abs(plan_weights - weights) > 0.02 * weights:
        section["notes"].append(f"the plan says {plan_weights} weight bytes, the parameters hold {weights}")
    measured_peak = context.get("prefill_peak_activation_bytes")
    if measured_peak is not None:
        row["prefill_peak_measured_gib"] = measured_peak / GIB
        if measured_peak > fields.get("lm_peak_bytes", 0) * 1.05:
            section["notes"].append(
                f"a prefill chunk in this run peaked at {measured_peak / GIB:.2f} GiB over what was allocated, above "
                f"the plan's LM peak of {fields.get('lm_peak_bytes', 0) / GIB:.2f} GiB"
            )


def _rate_row(row: dict, stats, flops: int, matmul_tflops: float, target: float) -> None:
    achieved = flops / (stats.median_ms * 1e-3) / 1e12
    row.update(
        ms=stats.median_ms,
        min_ms=stats.min_ms,
        flops=flops,
        tflop=flops / 1e12,
        achieved_tflops=achieved,
        ratio=achieved / matmul_tflops,
    )
    row["pass"] = row["ratio"] >= target


def _reset_peak(device: torch.device) -> int | None:
    """Start a peak-memory window; returns what is allocated now (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _all_known(*checks: bool | None) -> bool | None:
    known = [c for c in checks if c is not None]
    return all(known) if known else None


