"""`spaceserve profile` and the measurement behind it, on the tiny preset on CPU: the file it writes (entries kept
per key, the plots), several SM sides through the placement seam, a budget cut short, the start-up profile and
loading the engine's curves. What is timed on CPU means nothing; that everything lands where the allocator reads
it does."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from spaceserve.cli import main
from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.engine.core import EngineCore
from spaceserve.profile.curves_grid import CurveGrid, Side, device_placements, layout_placements, quick_grid
from spaceserve.profile.sm_curves import curves_key, engine_curves, image_grids, profile_engine, startup_curves
from spaceserve.sched.resource_curves import CurvesFile, ResourceCurves, Split

TINY_GRID = ["--patches", "16,64", "--batches", "0,1,3", "--contexts", "20,48", "--prefill-tokens", "0,16",
             "--max-iters", "1", "--kv-cache-memory-bytes", str(8 << 20), "--no-ceilings"]
GRID = CurveGrid("test", patches=(16, 64), batches=(0, 1, 3), contexts=(20, 48), prefill_tokens=(0, 16),
                 min_iters=1, max_iters=1, warmup=0)


@pytest.fixture(scope="module")
def engine():
    args = EngineArgs("tiny-qwen2-vl", kv_cache_memory_bytes=8 << 20, max_num_seqs=4)
    engine = EngineCore(args.create_engine_config())
    yield engine
    engine.shutdown()


def test_profile_command_writes_the_entry_keeps_others_and_plots(tmp_path):
    out = tmp_path / "curves.json"
    foreign = ResourceCurves.from_entry(_entry_for_key({"device": "Other GPU", "model": "m", "dtype": "bfloat16"}))
    file = CurvesFile()
    file.put(foreign.to_entry())
    file.write(out)
    code = main(["profile", "tiny-qwen2-vl", *TINY_GRID, "--out", str(out)])
    assert code == 0
    document = json.loads(out.read_text())
    assert len(document["entries"]) == 2
    curves = ResourceCurves.load(out, model="tiny-qwen2-vl")
    entry = next(e for e in document["entries"].values() if e["key"]["model"] == "tiny-qwen2-vl")
    measured = entry["measured"]
    assert measured["complete"] and measured["skipped_points"] == 0 and measured["grid"]["patches"] == [16, 64]
    assert measured["versions"]["torch"] and "triton" in measured["versions"] and measured["commit"]
    assert measured["engine_args"]["multiplex"] == "time" and measured["engine_args"]["max_num_seqs"] == 4
    assert entry["partitioned"] is False and "no SM partitions" in entry["placement_note"]
    assert curves.key.dtype == "float32" and curves.total_sms == 1 and curves.splits == ()
    raw = np.asarray(curves.lm_step.raw_ms)
    assert raw.shape == (1, 3, 2, 2)
    assert raw[0, 0, :, 0].tolist() == [0.0, 0.0]  # the empty step
    assert np.all(raw[0, 1:] > 0) and np.all(raw[0, 0, :, 1] > 0)
    assert raw[0, 0, 0, 1] == raw[0, 0, 1, 1]  # a prefill-only step is the same at every context
    assert np.all(np.asarray(curves.encoder.raw_ms) > 0)
    plots = sorted((tmp_path / "curves-plots").glob("*.png"))
    assert [p.name for p in plots] == ["encoder.png", "lm_decode.png", "lm_mixed.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)


def test_profile_refuses_to_overwrite_a_file_that_is_not_curves(tmp_path, capsys):
    out = tmp_path / "notes.json"
    out.write_text('{"mine": 1}')
    assert main(["profile", "tiny-qwen2-vl", *TINY_GRID, "--out", str(out)]) == 2
    assert "is not a curves file" in capsys.readouterr().err
    assert out.read_text() == '{"mine": 1}'


def test_several_sm_sides_become_the_grid_and_load(engine):
    sides = (Side(8), Side(16), Side(32))
    placements = SimpleNamespace(total_sms=32, splits=(Split(8, 24), Split(16, 16)), encoder_sides=sides,
                                 lm_sides=(Side(16), Side(24), Side(32)), partitioned=True, note="fake sides")
    entry = profile_engine(engine, placements, GRID, time_budget_s=600, key=curves_key(engine))
    curves = ResourceCurves.from_entry(entry)
    assert curves.encoder.grid[0].tolist() == [8, 16, 32] and curves.lm_step.grid[0].tolist() == [16, 24, 32]
    assert curves.encoder.grid[1].tolist() == [16, 64]
    assert curves.splits == (Split(8, 24), Split(16, 16))
    assert np.all(np.isfinite(curves.lm_step.raw_ms)) and entry["measured"]["complete"]
    engine.check_idle_integrity()  # every synthetic block went back


def test_a_budget_cut_short_still_measures_the_cheapest_shape(engine):
    entry = profile_engine(engine, device_placements(engine.device, GRID, None), GRID, time_budget_s=1e-6,
                           key=curves_key(engine))
    measured = entry["measured"]
    assert not measured["complete"] and measured["skipped_points"] > 0
    curves = ResourceCurves.from_entry(entry)
    assert curves.encoder.num_filled == 1 and curves.lm_step.num_filled > 0
    assert curves.encoder_ms(1, 64) >= curves.encoder_ms(1, 16) > 0


def test_startup_profile_and_engine_curves(engine, tmp_path):
    curves = startup_curves(engine, time_budget_s=30, grid=GRID)
    assert curves.key == ResourceCurves.from_entry(_entry_for_key(curves_key(engine))).key
    assert curves.total_sms == 1 and curves.splits == ()
    path = tmp_path / "curves.json"
    file = CurvesFile()
    file.put(_entry_for_key(curves_key(engine)))
    file.write(path)
    config = EngineArgs("tiny-qwen2-vl", sm_curves=str(path)).create_engine_config()
    loaded = engine_curves(SimpleNamespace(config=config, device=engine.device, dtype=engine.dtype))
    assert loaded.key.model == "tiny-qwen2-vl" and loaded.total_sms == 132


def test_startup_profile_stays_within_the_engines_step_limits(engine):
    """A serving engine's start-up grid may ask for a step it cannot take (on the H200: 256 decodes and a prefill
    against max_num_seqs=256 killed the engine at start-up); such points are left to the curves' envelope."""
    grid = CurveGrid("over", patches=(16,), batches=(0, 1, 4), contexts=(20,), prefill_tokens=(0, 16),
                     min_iters=1, max_iters=1, warmup=0)
    entry = profile_engine(engine, device_placements(engine.device, grid, None), grid, time_budget_s=30,
                           key=curves_key(engine))
    assert any("max_num_seqs=4" in error for error in entry["measured"]["errors"])
    median = np.array(entry["curves"]["lm_step"]["median_ms"], dtype=float)  # None (unmeasured) reads as nan
    assert np.isnan(median[0, 2, 0, 1]) and np.isfinite(median[0, 2, 0, 0]) and np.isfinite(median[0, 1, 0, 1])
    ResourceCurves.from_entry(entry)


def test_startup_profile_stays_within_the_engines_model_length():
    """On the H200 a 1024-token engine's start-up profile asked for 2048-token contexts and the input batch refused
    them mid-profile; such points are left out like the others past the engine's limits."""
    short = EngineCore(EngineArgs("tiny-qwen2-vl", kv_cache_memory_bytes=8 << 20, max_num_seqs=4,
                                  max_model_len=64).create_engine_config())
    try:
        grid = CurveGrid("long", patches=(16,), batches=(0, 2), contexts=(20, 100), prefill_tokens=(0, 16),
                         min_iters=1, max_iters=1, warmup=0)
        entry = profile_engine(short, device_placements(short.device, grid, None), grid, time_budget_s=30,
                               key=curves_key(short))
        assert any("max_model_len=64" in error for error in entry["measured"]["errors"])
        median = np.array(entry["curves"]["lm_step"]["median_ms"], dtype=float)
        assert np.isnan(median[0, 1, 1, 0]) and np.isfinite(median[0, 1, 0, 0])  # batch 2: context 100 left out
        short.check_idle_integrity()
    finally:
        short.shutdown()


def test_layout_and_device_placements():
    partition = SimpleNamespace(encoder_sms=48, lm_sms=84, encoder_stream="e48", lm_stream="l48")
    other = SimpleNamespace(encoder_sms=96, lm_sms=36, encoder_stream="e96", lm_stream="l96")
    layout = SimpleNamespace(mode="space", partitions=(partition, other), encoder_full_stream="ewhole")
    placements = layout_placements(layout, 132, "lwhole")
    assert [(s.sms, s.stream) for s in placements.encoder_sides] == [(48, "e48"), (96, "e96"), (132, "ewhole")]
    assert [(s.sms, s.stream) for s in placements.lm_sides] == [(36, "l96"), (84, "l48"), (132, "lwhole")]
    assert placements.splits == (Split(48, 84), Split(96, 36))
    time_layout = layout_placements(SimpleNamespace(mode="time", partitions=()), 132, None)
    assert [s.sms for s in time_layout.lm_sides] == [132] and not time_layout.partitioned
    cpu = device_placements(__import__("torch").device("cpu"), quick_grid(), None)
    assert cpu.total_sms == 1 and not cpu.partitioned


def test_vision_graph_buckets_are_the_measured_batches():
    from spaceserve.profile.sm_curves import vision_graph_buckets_for

    grid = CurveGrid("g", patches=(1024, 4096, 9216, 18432), batches=(0, 1), contexts=(64,), prefill_tokens=(0,))
    assert vision_graph_buckets_for(grid, 2) == (1024, 4096, 9216, 18432)


@pytest.mark.parametrize("patches, largest", [(1024, 9216), (36864, 9216), (18432, 9216), (100, 64)])
def test_encoder_batches_are_equal_images_under_the_largest(patches, largest):
    grids = image_grids(patches, largest, 2)
    assert all(t == 1 and h % 2 == 0 and w % 2 == 0 and h * w <= largest * 1.1 for t, h, w in grids)
    assert sum(h * w for _, h, w in grids) == pytest.approx(patches, rel=0.15)


def test_grid_settings_are_checked():
    with pytest.raises(ValueError, match="increasing"):
        CurveGrid("bad", patches=(64, 16), batches=(0,), contexts=(8,), prefill_tokens=(0,))
    with pytest.raises(ValueError, match="strides"):
        CurveGrid("bad", patches=(16,), batches=(0,), contexts=(8,), prefill_tokens=(0,), lm_sm_stride=0)


def _entry_for_key(key: dict[str, str]) -> dict:
    from tests.sched.fake_curves import fake_curves

    entry = fake_curves().to_entry()
    entry["key"] = dict(key)
    return entry


def test_gpu_script_summarizes_a_curves_file(tmp_path):
    import importlib.util
    from pathlib import Path

    from tests.sched.fake_curves import fake_curves

    entry = fake_curves(noise=0.05).to_entry()
    entry.update(placement_note="fake splits", ceilings={},
                 measured={"seconds": 1.0, "complete": True, "skipped_points": 0, "errors": [], "command": "x"})
    file = CurvesFile()
    file.put(entry)
    file.write(tmp_path / "sm_curves.json")
    script = Path(__file__).resolve().parents[2] / "scripts" / "sm_curves_gpu.py"
    spec = importlib.util.spec_from_file_location("sm_curves_gpu", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.summarize(tmp_path)
    assert (tmp_path / "summary.md").read_text() == text
    assert "Encoder batch (ms, median)" in text and "| 132 |" in text
    assert "| 1 | 0 x 0 | encoder_whole | 132 | 0 |" in text  # a lone image with nothing decoding: the whole GPU
    assert "| 0 | 128 x 2048 | lm_whole | 0 | 132 |" in text


def test_profiling_engine_fits_the_grid_and_runs_in_time_mode():
    import argparse

    from spaceserve.profile.cli import add_profile_parser, grid_from_args, profiling_engine_args

    parser = argparse.ArgumentParser()
    add_profile_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["profile", "Qwen/Qwen2-VL-2B-Instruct", "--multiplex", "space", "--load-format", "dummy"])
    grid = grid_from_args(args)
    engine_args = profiling_engine_args(args, grid)
    assert engine_args.multiplex == "time" and engine_args.max_num_seqs == 257
    assert engine_args.cuda_graph_sizes == (1, 16, 64, 256)
    assert engine_args.max_num_batched_tokens == 8192 + 256
    assert engine_args.num_gpu_blocks_override == 256 * (4096 // 16) + 8192 // 16 + 64
    given = parser.parse_args(["profile", "tiny-qwen2-vl", "--kv-cache-memory-bytes", "1000000", "--quick"])
    assert profiling_engine_args(given, grid_from_args(given)).num_gpu_blocks_override is None
