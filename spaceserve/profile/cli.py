"""`spaceserve profile MODEL [engine flags] [--out FILE] [--quick]`: measure the resource-utility curves of MODEL on
this device (encoder batch latency against SMs and patches; LM step latency against SMs, decode batch, context and
prefill chunk) and write them, with the device's ceilings and the versions that ran, as the entry for (device,
model, dtype) of a curves file (other entries in the file are kept), plus one PNG per curve.

The engine is built from the engine flags as `spaceserve serve` would build it, in time mode (the profile makes the
SM splits itself), with room for the grid's largest step. `--sm-curves FILE` gives a serving engine the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
import time
from pathlib import Path

from spaceserve.core.errors import SpaceServeError
from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.profile.curves_grid import GRIDS, CurveGrid, device_placements
from spaceserve.sched.resource_curves import CurvesError, CurvesFile, ResourceCurves

logger = logging.getLogger(__name__)


def add_profile_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    profile = commands.add_parser("profile", help="measure SM resource-utility curves for --sm-curves",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    EngineArgs.add_cli_args(profile)
    grid = profile.add_argument_group("grid (default: a few minutes on an H200 for a 2B model)")
    grid.add_argument("--quick", action="store_true", help="the start-up grid: a few splits, seconds")
    grid.add_argument("--patches", type=_ints, default=None, help="encoder batch sizes in patches, e.g. 1024,4096")
    grid.add_argument("--batches", type=_ints, default=None, help="decodes per LM step, e.g. 0,1,16,64,256")
    grid.add_argument("--contexts", type=_ints, default=None, help="decode context lengths, e.g. 1024,4096")
    grid.add_argument("--prefill-tokens", type=_ints, default=None, help="prefill chunk per step, e.g. 0,512,2048")
    grid.add_argument("--profile-encoder-sms", type=_ints, default=None,
                      help="measure these encoder splits (rounded by the driver) instead of every one")
    grid.add_argument("--encoder-sm-stride", type=int, default=None, help="every k-th split for the encoder curve")
    grid.add_argument("--lm-sm-stride", type=int, default=None, help="every k-th split for the LM curve")
    grid.add_argument("--min-iters", type=int, default=None, help="fewest timed calls per point")
    grid.add_argument("--max-iters", type=int, default=None, help="most timed calls per point")
    grid.add_argument("--time-budget-s", type=float, default=900.0,
                      help="stop measuring after this long (points left are filled from cheaper ones)")
    out = profile.add_argument_group("results")
    out.add_argument("--out", default="sm_curves.json", help="the curves file to write (its entry is replaced)")
    out.add_argument("--plots", default=None, help="directory for the PNGs (default: next to --out)")
    out.add_argument("--no-ceilings", action="store_true", help="skip the copy / matmul ceilings")
    return profile


def grid_from_args(args: argparse.Namespace) -> CurveGrid:
    grid = GRIDS["quick" if args.quick else "default"]()
    overrides = {
        "patches": args.patches,
        "batches": args.batches,
        "contexts": args.contexts,
        "prefill_tokens": args.prefill_tokens,
        "encoder_sms": args.profile_encoder_sms,
        "encoder_sm_stride": args.encoder_sm_stride,
        "lm_sm_stride": args.lm_sm_stride,
        "min_iters": args.min_iters,
        "max_iters": args.max_iters,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "max_iters" in overrides and "min_iters" not in overrides:
        overrides["min_iters"] = min(grid.min_iters, overrides["max_iters"])
    if overrides:
        grid = dataclasses.replace(grid, name=f"{grid.name}+custom", **overrides)
    return grid


def probe_grid_splits(config, grid: CurveGrid) -> dict | None:
    """Probe both sides of every split the grid measures (runtime/sm_probe.py), before this process makes a CUDA
    context; None where there are no splits to probe."""
    import torch

    from spaceserve.profile.curves_grid import grid_split_counts
    from spaceserve.runtime.sm_partition import get_partition_manager, green_context_support
    from spaceserve.runtime.sm_probe import model_gemm_shapes, probe_splits

    if not torch.cuda.is_available():
        return None
    device = torch.device("cuda", 0)
    if green_context_support(device):
        return None
    encoder_counts, lm_counts = grid_split_counts(get_partition_manager(device), grid)
    begin = time.monotonic()
    probes = probe_splits(sorted(set(encoder_counts) | set(lm_counts)), model_gemm_shapes(config), device_index=0)
    logger.info("profile: probed %d sides in %.1f s, %d failed", len(probes), time.monotonic() - begin,
                sum(not p.ok for p in probes.values()))
    return probes


def profiling_engine_args(args: argparse.Namespace, grid: CurveGrid) -> EngineArgs:
    """The user's engine flags, in time mode, with room for the grid's largest step and decode graphs of its
    batch sizes. Unless a KV size is given, the KV cache holds just the largest step's blocks: the rest of the
    device stays free for the allocator's pools of every SM side's stream (each stream caches its own blocks)."""
    base = EngineArgs.from_cli_args(args)
    largest_batch = max(grid.batches)
    longest = max(max(grid.contexts), max(grid.prefill_tokens)) + 1
    blocks = None
    if base.num_gpu_blocks_override is None and base.kv_cache_memory_bytes is None:
        per_sequence = -(-max(grid.contexts) // base.block_size)
        blocks = largest_batch * per_sequence + -(-max(grid.prefill_tokens) // base.block_size) + 64
    return dataclasses.replace(
        base,
        num_gpu_blocks_override=blocks if blocks is not None else base.num_gpu_blocks_override,
        multiplex="time",
        max_num_seqs=largest_batch + 1,  # the decodes and the prefilling prompt
        max_num_batched_tokens=max(base.max_num_batched_tokens, max(grid.prefill_tokens) + largest_batch),
        max_model_len=None if base.max_model_len is None else max(base.max_model_len, longest),
        cuda_graph_sizes=tuple(b for b in grid.batches if b > 0) or None,
        sm_curves=None,
    )


def run_profile(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        grid = grid_from_args(args)
        existing = _existing_file(Path(args.out))
        engine_args = profiling_engine_args(args, grid)
        config = engine_args.create_engine_config()
        if config.vision_cuda_graphs and config.vision_cuda_graph_patches is None:
            from spaceserve.profile.sm_curves import vision_graph_buckets_for

            merge = config.model_config.vision.spatial_merge_size
            config = dataclasses.replace(config, vision_cuda_graph_patches=vision_graph_buckets_for(grid, merge))
    except (ValueError, SpaceServeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    from spaceserve.bench.report import git_state
    from spaceserve.engine.core import EngineCore
    from spaceserve.profile.curves_plot import plot_curves
    from spaceserve.profile.sm_curves import curves_key, profile_engine
    from spaceserve.profile.synthetic import fill_kv_caches_random

    begin = time.monotonic()
    probes = probe_grid_splits(config, grid)
    engine = EngineCore(config)
    try:
        fill_kv_caches_random(engine, seed=args.seed + 1)
        ceilings = {} if args.no_ceilings else _ceilings(engine.device)
        placements = device_placements(engine.device, grid, engine.model_runner.stream, probes)
        logger.info("profile: %s; encoder on %s SMs, LM on %s SMs", placements.note,
                    [s.sms for s in placements.encoder_sides], [s.sms for s in placements.lm_sides])
        left = args.time_budget_s - (time.monotonic() - begin)
        entry = profile_engine(engine, placements, grid, time_budget_s=max(1.0, left), key=curves_key(engine),
                               seed=args.seed)
    finally:
        engine.shutdown()
    commit, dirty = git_state()
    entry["measured"].update(
        command=shlex.join(sys.argv),
        commit=commit,
        dirty=dirty,
        versions=_versions(torch),
        engine_args={k: v for k, v in dataclasses.asdict(engine_args).items() if v is not None},
        attention_backend=config.attention_backend,
        sm_probe_failures=[p.__dict__ for p in (probes or {}).values() if not p.ok],
        total_seconds=round(time.monotonic() - begin, 2),
    )
    entry["ceilings"] = ceilings
    key = existing.put(entry)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    existing.write(args.out)
    plots = Path(args.plots) if args.plots else Path(args.out).with_name(Path(args.out).stem + "-plots")
    try:
        written = plot_curves(entry, plots)
    except ImportError as exc:  # matplotlib comes with the test extra; the curves are written either way
        written = []
        print(f"no plots: {exc}", file=sys.stderr)
    curves = ResourceCurves.from_entry(entry)
    measured = entry["measured"]
    print(f"wrote {key} to {args.out} ({measured['seconds']:.0f} s measuring, {measured['skipped_points']} points "
          f"skipped, {curves.encoder.num_filled + curves.lm_step.num_filled} filled, "
          f"{curves.encoder.num_raised + curves.lm_step.num_raised} raised to keep the curves monotone)")
    print("plots: " + ", ".join(str(p) for p in written))
    return 0 if measured["complete"] else 1


def _existing_file(path: Path) -> CurvesFile:
    """The file's entries when it exists (so one file holds several models), refusing to overwrite another file."""
    if not path.exists():
        return CurvesFile()
    try:
        return CurvesFile.read(path)
    except CurvesError as exc:
        raise CurvesError(f"--out {path} exists and is not a curves file ({exc}); choose another path") from None


def _ceilings(device) -> dict:
    from spaceserve.profile.hardware import measure_copy_bandwidth, measure_matmul_tflops

    if device.type == "cuda":
        copy, matmul = measure_copy_bandwidth(device), measure_matmul_tflops(device)
    else:
        import torch

        copy = measure_copy_bandwidth(device, 1 << 22, iters=3)
        matmul = measure_matmul_tflops(device, torch.float32, 256, iters=3)
    return {"copy_bandwidth": copy.to_dict(), "matmul": matmul.to_dict()}


def _versions(torch) -> dict:
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    if torch.cuda.is_available():
        versions["device_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        try:
            from cuda.bindings import driver

            err, version = driver.cuDriverGetVersion()
            versions["driver_cuda"] = f"{version // 1000}.{version % 1000 // 10}"
        except Exception:  # noqa: BLE001 - a version we cannot read is recorded as unknown
            versions["driver_cuda"] = None
    return versions


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,1,16, got {text!r}") from None
