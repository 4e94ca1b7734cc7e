"""Vision-encoder CUDA graphs. On the CPU the capture seam is `eager_replay` (the "graph" re-runs the captured forward
over the same fixed buffers), so the whole padded-bucket path is exercised: buffers packed and refilled between
batches, padding rows in segments of their own dropped after the merger, the window order of Qwen2.5-VL, batches past
the largest bucket running eagerly, and greedy tokens through the engine equal with and without graphs. On a GPU
(marked gpu) real graphs are captured on a stream and on an SM-partition stream and compared with eager."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from spaceserve import SamplingParams
from spaceserve.core.errors import ConfigError, InvalidInputError
from spaceserve.core.multimodal import MultiModalFeature, PlaceholderRange
from spaceserve.core.scheduler_output import EncoderBatch
from spaceserve.models.config import ImageProcessorConfig, ModelConfig
from spaceserve.models.qwen2_5_vl.vision import Qwen2_5_VisionTransformer
from spaceserve.models.qwen2_vl.vision import Qwen2VisionTransformer
from spaceserve.models.resolve import PRESETS_DIR
from spaceserve.runtime.encoder_runner import EncoderRunner
from spaceserve.runtime.vision_graphs import VisionCUDAGraphs, eager_replay, vision_graph_buckets
from tests.engine.parity import MAX_NEW_TOKENS, random_image, random_prompt, reference_generate, reference_processor
from tests.llm_factory import make_llm
from tests.tiny_checkpoints import load_reference_model, make_tiny_checkpoint
from tests.tiny_tokenizer import write_tiny_tokenizer

PRESETS = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]
IMAGES = ImageProcessorConfig()  # for raw images, which these tests do not send
CPU = torch.device("cpu")
HAS_CUDA = torch.cuda.is_available()
gpu_only = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]


def test_the_default_ladder_ends_at_the_encoder_budget():
    buckets = vision_graph_buckets(budget_tokens=16384, merge=2)
    assert buckets[0] == 256 and buckets[-1] == 16384 * 4
    assert all(b % 256 == 0 for b in buckets) and list(buckets) == sorted(set(buckets))
    ratios = [b / a for a, b in zip(buckets, buckets[1:])]
    assert max(ratios[4:]) <= 1.25  # past the smallest sizes each step is about 2**(1/4) (rounded to 256 patches)
    assert 9216 < next(b for b in buckets if b >= 9216) <= 9216 * 1.1
    assert vision_graph_buckets(budget_tokens=1000, merge=2)[-1] == 4000  # the budget itself is a bucket
    assert vision_graph_buckets(8192, 2, (4096, 1024, 1024)) == (1024, 4096)
    with pytest.raises(ConfigError, match="multiples of 4"):
        vision_graph_buckets(8192, 2, (1026,))


def test_the_engine_settings_choose_the_buckets_and_whether_the_encoder_still_runs_eagerly():
    import argparse
    import dataclasses

    from spaceserve.engine.arg_utils import EngineArgs
    from spaceserve.runtime.runner_setup import encoder_runs_eagerly, vision_graph_patch_buckets

    config = EngineArgs("tiny-qwen2-vl", encoder_budget_tokens=512, encoder_cache_tokens=512).create_engine_config()
    cuda = torch.device("cuda")  # only its type is read
    assert vision_graph_patch_buckets(config, CPU) == ()
    assert vision_graph_patch_buckets(dataclasses.replace(config, enforce_eager=True), cuda) == ()
    assert vision_graph_patch_buckets(dataclasses.replace(config, vision_cuda_graphs=False), cuda) == ()
    pytest.importorskip("triton")
    buckets = vision_graph_patch_buckets(config, cuda)
    assert buckets[-1] == 512 * 4
    graphs = VisionCUDAGraphs(_tower("tiny-qwen2-vl"), buckets, CPU, torch.float32, capture=eager_replay)
    assert not encoder_runs_eagerly(config, graphs)
    assert encoder_runs_eagerly(dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, cache_tokens=600)), graphs)
    assert encoder_runs_eagerly(config, None)

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = EngineArgs.from_cli_args(parser.parse_args(
        ["tiny-qwen2-vl", "--disable-vision-cuda-graphs", "--vision-cuda-graph-patches", "1024,256"]))
    parsed = args.create_engine_config()
    assert parsed.vision_cuda_graphs is False and parsed.vision_cuda_graph_patches == (1024, 256)
    assert vision_graph_patch_buckets(dataclasses.replace(parsed, vision_cuda_graphs=True), cuda) == (256, 1024)


def _tower(preset: str, seed: int = 3) -> torch.nn.Module:
    config = ModelConfig.from_hf_dict(json.loads((PRESETS_DIR / preset / "config.json").read_text())).vision
    tower = (Qwen2VisionTransformer if preset == "tiny-qwen2-vl" else Qwen2_5_VisionTransformer)(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in tower.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    return tower.eval()


class _Model(torch.nn.Module):
    """What EncoderRunner reads of a model: config.vision, encode_images."""

    def __init__(self, tower: torch.nn.Module) -> None:
        super().__init__()
        self.visual = tower
        self.config = type("Config", (), {"vision": tower.config})()

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return self.visual(pixel_values, grid_thw)


def _batch(rng: np.random.Generator, grids, patch_dim: int) -> EncoderBatch:
    items = []
    for index, (t, h, w) in enumerate(grids):
        pixels = torch.from_numpy(rng.standard_normal((t * h * w, patch_dim), dtype=np.float32))
        tokens = t * h * w // 4
        items.append(MultiModalFeature(f"item-{index}-{rng.integers(1 << 30)}", "image" if t == 1 else "video",
                                       PlaceholderRange(0, tokens), t * h * w, (t, h, w), pixels))  # fmt: skip
    return EncoderBatch(tuple(items))


def _eager(tower, batch: EncoderBatch) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return EncoderRunner(_Model(tower), CPU, IMAGES).execute(batch)


def _assert_same_embeddings(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].shape == expected[key].shape
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)


# grids in patches (t, h, w), h and w multiples of 2; the tiny Qwen2.5 tower's windows are 4x4 merge units
MIXES = {
    "one image": [(1, 16, 20)],
    "mixed sizes": [(1, 4, 6), (1, 12, 8), (1, 2, 2), (1, 10, 14)],
    "video frames": [(3, 6, 8), (1, 8, 8), (2, 16, 4)],
    "exact fit": [(1, 16, 16)],
}


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def tiny_checkpoint(request, tmp_path_factory):
    """A tiny transformers-written checkpoint (tests/tiny_checkpoints.py) with its tokenizer."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=23)
    write_tiny_tokenizer(path)
    return path


def _checkpoint_tower(path) -> torch.nn.Module:
    from spaceserve.models.loader import build_model
    from spaceserve.models.resolve import resolve_model

    config = resolve_model(str(path)).model_config
    return build_model(config, directory=path, load_format="auto", dtype=torch.float32, device=CPU).visual


def test_padded_buckets_give_the_eager_embeddings(tiny_checkpoint):
    """Batches of several mixes, one after another through the same set (stale buffers in between), each against
    the unpadded eager tower; the last is larger than the largest bucket and runs eagerly."""
    tower = _checkpoint_tower(tiny_checkpoint)
    graphs = VisionCUDAGraphs(tower, (64, 256, 512), CPU, torch.float32, capture=eager_replay, use_triton=False)
    graphs.capture_on([None])
    runner = EncoderRunner(_Model(tower), CPU, IMAGES, graphs)
    rng = np.random.default_rng(random.randrange(2**31))
    patch_dim = tower.config.patch_dim
    mixes = list(MIXES.values())
    random.shuffle(mixes)
    for grids in mixes + mixes[::-1]:
        batch = _batch(rng, grids, patch_dim)
        _assert_same_embeddings(runner.execute(batch), _eager(tower, batch))
    assert runner.num_graphed_batches == 2 * len(mixes) and runner.num_eager_batches == 0
    too_large = _batch(rng, [(1, 20, 20), (1, 16, 12)], patch_dim)  # 592 patches > 512
    _assert_same_embeddings(runner.execute(too_large), _eager(tower, too_large))
    assert runner.num_eager_batches == 1


def test_the_triton_graph_path_gives_the_eager_embeddings(tiny_checkpoint):
    """The Triton kernels' fixed grids and device-counted work lists, under the interpreter (small buckets)."""
    pytest.importorskip("triton")
    from spaceserve.layers.attention.triton import interpreting

    if not interpreting():
        pytest.skip("runs the kernels on CPU tensors under the Triton interpreter")
    tower = _checkpoint_tower(tiny_checkpoint)
    graphs = VisionCUDAGraphs(tower, (96, 160), CPU, torch.float32, capture=eager_replay, use_triton=True)
    graphs.capture_on([None])
    runner = EncoderRunner(_Model(tower), CPU, IMAGES, graphs)
    rng = np.random.default_rng(random.randrange(2**31))
    for grids in ([(1, 4, 6), (2, 2, 4), (1, 6, 4)], [(1, 8, 16)], [(1, 2, 2)]):
        batch = _batch(rng, grids, tower.config.patch_dim)
        _assert_same_embeddings(runner.execute(batch), _eager(tower, batch))
    assert runner.num_graphed_batches == 3


def test_bad_items_are_refused_before_anything_is_staged():
    tower = _tower("tiny-qwen2-vl")
    graphs = VisionCUDAGraphs(tower, (256,), CPU, torch.float32, capture=eager_replay, use_triton=False)
    graphs.capture_on([None])
    runner = EncoderRunner(_Model(tower), CPU, IMAGES, graphs)
    rng = np.random.default_rng(0)
    good = _batch(rng, [(1, 4, 6)], tower.config.patch_dim)
    expected = _eager(tower, good)
    item = good.items[0]
    wrong_rows = EncoderBatch((MultiModalFeature(item.mm_hash, "image", item.placeholder, 24, (1, 4, 6),
                                                 item.pixel_values[:20]),))  # fmt: skip
    with pytest.raises(InvalidInputError, match="pixel_values"):
        runner.execute(wrong_rows)
    odd_grid = EncoderBatch((MultiModalFeature(item.mm_hash, "image", item.placeholder, 15, (1, 3, 5),
                                               item.pixel_values[:15]),))  # fmt: skip
    with pytest.raises(InvalidInputError, match="multiples of 2"):
        runner.execute(odd_grid)
    _assert_same_embeddings(runner.execute(good), expected)


def test_a_stream_without_a_set_runs_eagerly():
    tower = _tower("tiny-qwen2-vl")
    graphs = VisionCUDAGraphs(tower, (256,), CPU, torch.float32, capture=eager_replay, use_triton=False)
    runner = EncoderRunner(_Model(tower), CPU, IMAGES, graphs)  # nothing captured: no set for any stream
    batch = _batch(np.random.default_rng(1), [(1, 4, 6)], tower.config.patch_dim)
    _assert_same_embeddings(runner.execute(batch), _eager(tower, batch))
    assert runner.num_eager_batches == 1 and graphs.streams() == ()


# ---- the engine: greedy tokens with and without vision graphs, against transformers ----

GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    """The checkpoint, prompts with images of several sizes, and transformers' greedy continuation of each."""
    path = tiny_checkpoint
    reference = load_reference_model(path)
    processor = reference_processor()
    rng = np.random.default_rng(9)
    prompts, expected = [], []
    for sizes in ([(70, 95)], [(37, 130), (90, 61), (151, 47)], [], [(200, 180), (30, 30)]):
        images = [random_image(rng, h, w) for h, w in sizes]
        ids = random_prompt(rng, len(images))
        prompts.append({"prompt_token_ids": ids, "multi_modal_data": {"image": images}})
        expected.append(reference_generate(reference, processor, ids, images))
    return path, prompts, expected


def _engine_tokens(path, prompts, multiplex: str, with_graphs: bool) -> list[list[int]]:
    llm = make_llm(str(path), device="cpu", multiplex=multiplex, encoder_budget_tokens=128)
    engine = llm.llm_engine
    runner = engine.core.encoder_stage.runner
    try:
        if with_graphs:
            graphs = VisionCUDAGraphs(engine.core.model.visual, (128, 256, 512), CPU, torch.float32,
                                      capture=eager_replay, use_triton=False)  # fmt: skip
            graphs.capture_on([None])
            runner.attach_vision_graphs(graphs)
        tokens = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, GREEDY)]
        graphed = runner.num_graphed_batches
        assert (graphed > 0) == with_graphs
        engine.check_idle_integrity()
        return tokens
    finally:
        engine.shutdown()


@pytest.mark.parametrize("multiplex", ["time", "streams"])
def test_engine_tokens_equal_with_and_without_vision_graphs(checkpoint, multiplex):
    path, prompts, expected = checkpoint
    assert _engine_tokens(path, prompts, multiplex, with_graphs=False) == expected
    assert _engine_tokens(path, prompts, multiplex, with_graphs=True) == expected


# ---- on a GPU: real graphs on a stream and on an SM-partition stream ----


def _gpu_tower(preset: str) -> torch.nn.Module:
    return _tower(preset).to("cuda")


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("_", [pytest.param(None, id="gpu", marks=gpu_only)])
def test_cuda_graphs_on_a_side_stream_match_eager(preset, _):
    tower = _gpu_tower(preset)
    device = torch.device("cuda")
    stream = torch.cuda.Stream(device)
    graphs = VisionCUDAGraphs(tower, (256, 1024), device, torch.float32)
    graphs.capture_on([stream])
    assert graphs.memory_bytes(stream) > 0
    runner = EncoderRunner(_Model(tower), device, IMAGES, graphs)
    rng = np.random.default_rng(random.randrange(2**31))
    for grids in list(MIXES.values()) + [[(1, 32, 32)], [(1, 40, 40)]]:  # the last exceeds 1024: eager
        batch = _batch(rng, grids, tower.config.patch_dim)
        with torch.cuda.stream(stream):
            got = runner.execute(batch)
        stream.synchronize()
        _assert_same_embeddings({k: v.cpu() for k, v in got.items()},
                                {k: v.cpu() for k, v in EncoderRunner(_Model(tower), device, IMAGES).execute(batch).items()})
    assert runner.num_graphed_batches == len(MIXES) + 1 and runner.num_eager_batches == 1


@pytest.mark.parametrize("_", [pytest.param(None, id="gpu", marks=gpu_only)])
def test_cuda_graphs_on_an_sm_partition_stream_match_eager(_):
    from spaceserve.runtime.sm_partition import get_partition_manager, green_context_support

    device = torch.device("cuda", torch.cuda.current_device())
    reason = green_context_support(device)
    if reason is not None:
        pytest.skip(reason)
    partition = get_partition_manager(device).partition(16)
    tower = _gpu_tower("tiny-qwen2.5-vl")
    graphs = VisionCUDAGraphs(tower, (512,), device, torch.float32)
    graphs.capture_on([partition.encoder_stream])
    runner = EncoderRunner(_Model(tower), device, IMAGES, graphs)
    batch = _batch(np.random.default_rng(4), MIXES["video frames"], tower.config.patch_dim)
    with torch.cuda.stream(partition.encoder_stream):
        got = runner.execute(batch)
    partition.encoder_stream.synchronize()
    assert runner.num_graphed_batches == 1
    expected = EncoderRunner(_Model(tower), device, IMAGES).execute(batch)
    _assert_same_embeddings({k: v.cpu() for k, v in got.items()}, {k: v.cpu() for k, v in expected.items()})


@pytest.mark.parametrize("_", [pytest.param(None, id="gpu", marks=gpu_only)])
def test_time_mode_runs_the_encoder_graphs_on_the_lm_runners_stream(_):
    from spaceserve import LLM

    # a profiled memory plan (make_llm fixes the KV bytes, which skips the plan's deductions)
    llm = LLM("tiny-qwen2-vl", max_model_len=512, max_num_seqs=8, dtype="float32", encoder_budget_tokens=256,
              gpu_memory_utilization=0.25, cuda_graph_sizes=(1, 2))  # fmt: skip
    core = llm.llm_engine.core
    graphs = core.encoder_stage.runner.vision_graphs
    assert graphs is not None and graphs.streams() == (core.model_runner.stream,)
    assert core.memory_plan.vision_graph_bytes == graphs.total_memory_bytes > 0
    rng = np.random.default_rng(2)
    prompts = [{"prompt": "<|vision_start|><|image_pad|><|vision_end|> hi", "multi_modal_data": {"image": random_image(rng, 90, 120)}}]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=3))
    assert core.encoder_stage.runner.num_graphed_batches == 1
    eager = make_llm("tiny-qwen2-vl", max_model_len=512, dtype="float32", encoder_budget_tokens=256,
                     disable_vision_cuda_graphs=True)  # fmt: skip
    assert eager.llm_engine.core.encoder_stage.runner.vision_graphs is None
    forced = make_llm("tiny-qwen2-vl", max_model_len=512, enforce_eager=True)
    assert forced.llm_engine.core.encoder_stage.runner.vision_graphs is None
