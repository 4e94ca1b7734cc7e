"""Measures resource-utility curves on the engine's own runners: encoder batch latency against SMs and patches, LM
step latency against SMs, decode batch, context and prefill chunk. The result is one entry of a curves file
(sched/resource_curves.py), keyed by device, model and dtype.

Each point is timed as the engine core runs it: the encoder batch through `EncoderRunner.execute` on the stream of
the side being measured, the LM step through the runner's launch + collect (a decode-only step replays the decode graph
captured on that side's stream; mixed steps run eagerly, as in serving), both timed with CUDA events on that
stream, so host launch time the device waits for is in the figure. Work is synthetic (profile/synthetic.py): random
patches, random KV in shuffled blocks. Shapes are measured cheapest first and each on every SM side before the
next, so a deadline cuts whole expensive shapes (whose points the curves model fills from cheaper ones) and never
the first, cheapest one it cannot do without; slow drift in clocks spreads over all SM counts alike.

`profile_engine` is what `spaceserve profile` and the engine's start-up profile (`startup_curves`) both call.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from spaceserve.profile.curves_grid import CurveGrid, Placements, Side, layout_placements, quick_grid
from spaceserve.profile.synthetic import (
    DoesNotFit,
    check_sampled,
    encoder_batch,
    mixed_step,
    run_step,
    run_step_graphed,
)
from spaceserve.profile.timing import TimingStats, synchronize, time_calls
from spaceserve.sched.resource_curves import ENCODER_AXES, LM_STEP_AXES, ResourceCurves

logger = logging.getLogger(__name__)


@dataclass
class _Progress:
    deadline: float
    skipped: int = 0
    errors: list[str] = field(default_factory=list)
    graphed_decode: bool | None = None
    started: set[str] = field(default_factory=set)

    def late(self, curve: str) -> bool:
        """Past the deadline, except for a curve's first shape: the cheapest corner is always measured, so even a
        budget cut short leaves curves the model can fill."""
        if curve not in self.started:
            self.started.add(curve)
            return False
        return time.monotonic() > self.deadline


def image_grids(total_patches: int, max_image_patches: int, merge: int) -> list[tuple[int, int, int]]:
    """(t, h, w) patch grids of equal images, as square as the merge size allows, adding up to about
    `total_patches` with none above `max_image_patches`."""
    count = max(1, math.ceil(total_patches / max_image_patches))
    per_image = total_patches / count
    side = max(merge, round(math.sqrt(per_image) / merge) * merge)
    other = max(merge, round(per_image / side / merge) * merge)
    return [(1, side, other)] * count


def _on(side: Side):
    return torch.cuda.stream(side.stream) if side.stream is not None else contextlib.nullcontext()


def _timed(call: Callable[[], Any], device: torch.device, side: Side, grid: CurveGrid) -> TimingStats:
    """Warm-up, one probe, then as many timed calls as fit the point budget (within the grid's bounds). The
    caching allocator keeps blocks per stream, so what this side's stream cached is released afterwards: otherwise
    every SM side would hold a peak's worth of memory."""
    with _on(side):
        probe = time_calls(call, device, warmup=grid.warmup, iters=1)
        iters = int(min(grid.max_iters, max(grid.min_iters, grid.point_budget_ms // max(probe.min_ms, 1e-3))))
        rest = time_calls(call, device, warmup=0, iters=max(1, iters - 1))
    if device.type == "cuda" and side.stream is not None:
        torch.cuda.empty_cache()
    return TimingStats(probe.samples_ms + rest.samples_ms)


def measure_encoder(engine, placements: Placements, grid: CurveGrid, rng: np.random.Generator,
                    progress: _Progress) -> dict[str, np.ndarray]:
    vision = engine.config.model_config.vision
    sides = placements.encoder_sides
    median = np.full((len(sides), len(grid.patches)), np.nan)
    p90 = median.copy()
    measured_patches = []
    for j, patches in enumerate(grid.patches):
        grids = image_grids(patches, grid.max_image_patches, vision.spatial_merge_size)
        measured_patches.append(sum(t * h * w for t, h, w in grids))
        if progress.late("encoder"):
            progress.skipped += len(sides)
            continue
        batch = encoder_batch(engine, grids, rng)
        for i, side in enumerate(sides):
            with torch.inference_mode():
                stats = _timed(lambda: engine.encoder_stage.runner.execute(batch), engine.device, side, grid)
            median[i, j], p90[i, j] = stats.median_ms, stats.p90_ms
        del batch
        logger.info("profile: encoder %d patches on %s SMs: %s ms", measured_patches[-1],
                    [s.sms for s in sides], np.round(median[:, j], 2).tolist())
    if len(set(measured_patches)) != len(measured_patches):
        raise ValueError(f"the grid's patch counts {grid.patches} round to repeated batch sizes {measured_patches}")
    return {"sms": np.array([s.sms for s in sides]), "patches": np.array(measured_patches), "median": median,
            "p90": p90}


def _lm_shapes(grid: CurveGrid) -> list[tuple[int, int, int]]:
    """(batch, context, prefill) cheapest first (prefill chunks, compute-bound, cost most on small sides; then KV
    read); a prefill-only step is measured at the first context only."""
    shapes = [(b, c, p) for b in grid.batches for c in (grid.contexts if b else grid.contexts[:1])
              for p in grid.prefill_tokens if b or p]
    return sorted(shapes, key=lambda s: (s[2], s[0] * s[1], s[0]))


def measure_lm(engine, placements: Placements, grid: CurveGrid, rng: np.random.Generator,
               progress: _Progress) -> dict[str, np.ndarray]:
    runner = engine.model_runner
    vocab = engine.config.model_config.text.vocab_size
    sides = placements.lm_sides
    shape = (len(sides), len(grid.batches), len(grid.contexts), len(grid.prefill_tokens))
    median, p90 = np.full(shape, np.nan), np.full(shape, np.nan)
    if grid.batches[0] == 0 and grid.prefill_tokens[0] == 0:
        median[:, 0, :, 0] = p90[:, 0, :, 0] = 0.0  # the empty step
    home = runner.stream
    try:
        for b, c, p in _lm_shapes(grid):
            bi, ci, pi = grid.batches.index(b), grid.contexts.index(c), grid.prefill_tokens.index(p)
            if progress.late("lm_step"):
                progress.skipped += len(sides)
                continue
            try:
                step = mixed_step(engine, b, c, p, rng)
            except DoesNotFit as exc:
                progress.errors.append(f"batch {b} x context {c} + prefill {p}: {exc}")
                continue
            try:
                for i, side in enumerate(sides):
                    if side.stream is not None:
                        runner.use_stream(side.stream)
                    output, graphed = run_step_graphed(runner, step.scheduled, {})
                    check_sampled(output, step, vocab)
                    if p == 0 and graphed is not None:
                        progress.graphed_decode = bool(graphed) and progress.graphed_decode is not False
                    stats = _timed(lambda: run_step(runner, step.scheduled, {}), engine.device, side, grid)
                    median[i, bi, ci, pi], p90[i, bi, ci, pi] = stats.median_ms, stats.p90_ms
            finally:
                step.release(engine)
            if b == 0:  # a prefill-only step has no decodes: the same at every context
                median[:, bi, :, pi] = median[:, bi, ci : ci + 1, pi]
                p90[:, bi, :, pi] = p90[:, bi, ci : ci + 1, pi]
            logger.info("profile: LM step batch %d x context %d + prefill %d on %s SMs: %s ms", b, c, p,
                        [s.sms for s in sides], np.round(median[:, bi, ci, pi], 2).tolist())
    finally:
        if home is not None:
            runner.use_stream(home)
        synchronize(engine.device)
    return {"sms": np.array([s.sms for s in sides]), "median": median, "p90": p90}


def capture_graphs_on_sides(engine, placements: Placements) -> tuple[int, int]:
    """Decode graphs on every LM side's stream and vision graphs on every encoder side's (a graph runs on the SMs
    of the stream it was captured on), as serving has them; returns how many streams have each. Nothing to do
    without graphs (CPU, eager)."""
    runner = engine.model_runner
    graphs = getattr(runner, "cuda_graphs", None)
    lm_streams = 0
    if graphs is not None:
        sides = [s for s in placements.lm_sides if s.stream is not None and s.stream != runner.stream]
        for side in sides:
            try:
                runner.capture_cuda_graphs(graphs.sizes, (side.stream,))
            except RuntimeError as exc:
                raise RuntimeError(f"decode graphs on the {side.sms}-SM LM side: {exc}") from exc
        lm_streams = 1 + len(sides)
    vision = engine.encoder_stage.runner.vision_graphs
    encoder_streams = [s.stream for s in placements.encoder_sides if s.stream is not None]
    if vision is None or not encoder_streams:
        return lm_streams, 0
    vision.capture_on(encoder_streams)
    return lm_streams, len(encoder_streams)


def vision_graph_buckets_for(grid: CurveGrid, merge: int) -> tuple[int, ...]:
    """The measured encoder batches' patch counts: as vision-graph buckets each replays its own graph unpadded."""
    return tuple(sorted({sum(t * h * w for t, h, w in image_grids(p, grid.max_image_patches, merge))
                         for p in grid.patches}))


def profile_engine(engine, placements: Placements, grid: CurveGrid, *, time_budget_s: float,
                   key: dict[str, str], seed: int = 0) -> dict[str, Any]:
    """Measure both curves on `engine`; returns a curves-file entry (ResourceCurves.from_entry reads it)."""
    started = time.time()
    progress = _Progress(deadline=time.monotonic() + time_budget_s)
    rng = np.random.default_rng(seed)
    graph_streams, vision_streams = capture_graphs_on_sides(engine, placements)
    encoder_runner = engine.encoder_stage.runner
    graphed_before = encoder_runner.num_graphed_batches
    encoder = measure_encoder(engine, placements, grid, rng, progress)
    encoder_graphed = encoder_runner.num_graphed_batches - graphed_before
    lm = measure_lm(engine, placements, grid, rng, progress)
    entry = {
        "key": dict(key),
        "total_sms": placements.total_sms,
        "splits": [{"encoder_sms": s.encoder_sms, "lm_sms": s.lm_sms} for s in placements.splits],
        "partitioned": placements.partitioned,
        "placement_note": placements.note,
        "measured": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "seconds": round(time.time() - started, 2),
            "complete": progress.skipped == 0 and not progress.errors,
            "skipped_points": progress.skipped,
            "errors": progress.errors,
            "time_budget_s": time_budget_s,
            "grid": grid.as_dict(),
            "decode_graphs": progress.graphed_decode,
            "graph_streams": graph_streams,
            "vision_graph_streams": vision_streams,
            "encoder_graphed_batches": encoder_graphed,
            "encoder_eager_batches": encoder_runner.num_eager_batches,
            "encoder_batches": "equal images of at most max_image_patches patches each (grid above)",
        },
        "curves": {
            "encoder": {
                "axes": list(ENCODER_AXES),
                "grid": {"sms": encoder["sms"].tolist(), "patches": encoder["patches"].tolist()},
                "median_ms": _json_values(encoder["median"]),
                "p90_ms": _json_values(encoder["p90"]),
            },
            "lm_step": {
                "axes": list(LM_STEP_AXES),
                "grid": {"sms": lm["sms"].tolist(), "batch": list(grid.batches), "context": list(grid.contexts),
                         "prefill_tokens": list(grid.prefill_tokens)},
                "median_ms": _json_values(lm["median"]),
                "p90_ms": _json_values(lm["p90"]),
            },
        },
    }
    ResourceCurves.from_entry(entry)  # what was measured must load (raises with the reason otherwise)
    return entry


def startup_curves(engine, *, time_budget_s: float = 60.0, grid: CurveGrid | None = None) -> ResourceCurves:
    """The engine's curves without a curves file: the quick grid over the splits its layout already has, bounded
    by `time_budget_s` (points past it are left to the curves model's envelope), logged."""
    device = engine.device
    layout = engine.layout
    runner = engine.model_runner
    total = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    placements = layout_placements(layout, total, runner.stream)
    begin = time.monotonic()
    logger.info("profiling SM curves at start-up (%s grid, %d SM sides, at most %.0f s)",
                (grid or quick_grid()).name, len(placements.lm_sides), time_budget_s)
    entry = profile_engine(engine, placements, grid or quick_grid(), time_budget_s=time_budget_s,
                           key=curves_key(engine))
    curves = ResourceCurves.from_entry(entry)
    measured = entry["measured"]
    logger.info("start-up SM curves: %.1f s, %d points skipped past the budget, %d filled by the envelope",
                time.monotonic() - begin, measured["skipped_points"],
                curves.encoder.num_filled + curves.lm_step.num_filled)
    return curves


def engine_curves(engine, **startup) -> ResourceCurves:
    """The curves an engine allocates SMs with: its --sm-curves file's entry for this device, model and dtype, or
    a start-up profile without one."""
    path = engine.config.allocation.sm_curves
    if path is None:
        return startup_curves(engine, time_budget_s=engine.config.allocation.startup_profile_s, **startup)
    key = curves_key(engine)
    return ResourceCurves.load(path, **key)


def curves_key(engine) -> dict[str, str]:
    from spaceserve.bench.report import device_name

    return {"device": device_name(str(engine.device)), "model": engine.config.model,
            "dtype": str(engine.dtype).removeprefix("torch.")}


def _json_values(values: np.ndarray) -> Any:
    if values.ndim == 0:
        return None if math.isnan(values) else round(float(values), 4)
    return [_json_values(v) for v in values]
