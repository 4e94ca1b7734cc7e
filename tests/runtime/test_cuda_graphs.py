"""Decode CUDA graphs: the batch-size ladder and padding (CPU), and on a GPU: graphed decode gives the same greedy
tokens as eager (Triton backend) and as the torch reference, on a dummy model and on the tiny parity checkpoints,
with batches that pad, on a non-default stream, with no host sync while a graphed step is launched."""

from __future__ import annotations

import dataclasses

import gc

import numpy as np
import pytest
import torch

from spaceserve import SamplingParams
from spaceserve.core.errors import ConfigError
from spaceserve.runtime.cuda_graphs import DecodeCUDAGraphs, cuda_graph_batch_sizes
from tests.engine.parity import random_image, random_prompt
from tests.llm_factory import make_llm

SIZES = (1, 2, 4, 8)


def test_the_default_ladder_is_vllms():
    assert cuda_graph_batch_sizes(256) == (1, 2, 4) + tuple(range(8, 257, 8))
    assert cuda_graph_batch_sizes(1000)[-1] == 512
    assert cuda_graph_batch_sizes(6) == (1, 2, 4)
    assert cuda_graph_batch_sizes(64, (48, 3, 3, 100)) == (3, 48)
    with pytest.raises(ValueError, match="positive"):
        cuda_graph_batch_sizes(8, (0, 4))


def test_a_batch_replays_the_smallest_captured_size_that_holds_it():
    graphs = DecodeCUDAGraphs.__new__(DecodeCUDAGraphs)
    graphs.sizes = (1, 2, 4, 8, 16, 24)
    assert [graphs.padded_size(b) for b in (1, 2, 3, 5, 8, 9, 17, 24, 25)] == [1, 2, 4, 8, 8, 16, 24, 24, None]


def test_cpu_engines_run_eagerly_and_launch_collect_equals_execute():
    llm = make_llm("tiny-qwen2-vl", max_model_len=256, max_num_seqs=4, device="cpu")
    runner = llm.llm_engine.core.model_runner
    assert runner.cuda_graphs is None
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    outputs = llm.generate(["one two", "three", "four five six seven"], params)
    assert all(len(o.outputs[0].token_ids) == 5 for o in outputs)
    assert runner.num_graphed_steps == 0 and runner.num_eager_steps >= 5


def _prompts(rng: np.random.Generator, count: int) -> list[dict]:
    prompts = []
    for i in range(count):
        images = [random_image(rng, 40 + 13 * i, 60)] if i % 3 == 1 else []
        prompts.append({"prompt_token_ids": random_prompt(rng, len(images), text_len=5 + 3 * i), "multi_modal_data": {"image": images}})
    return prompts


def _generate(model: str, prompts, **kwargs):
    llm = make_llm(model, max_model_len=512, max_num_seqs=8, dtype="float32", **kwargs)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    return tokens, llm.llm_engine.core.model_runner


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
@pytest.mark.parametrize("batch", [1, 3, 5, 8])
def test_graphed_decode_equals_eager_and_the_torch_reference(model, batch):
    prompts = _prompts(np.random.default_rng(batch), batch)
    graphed, runner = _generate(model, prompts, attention_backend="triton", cuda_graph_sizes=SIZES)
    assert runner.cuda_graphs is not None and runner.cuda_graphs.sizes == SIZES
    assert runner.num_graphed_steps > 0
    eager, eager_runner = _generate(model, prompts, attention_backend="triton", enforce_eager=True)
    assert eager_runner.cuda_graphs is None and eager_runner.num_graphed_steps == 0
    reference, _ = _generate(model, prompts, attention_backend="torch")
    assert graphed == eager == reference
    if batch > 1:  # a random tiny model may repeat one token for a single prompt; across several it must not
        assert len({t for tokens in graphed for t in tokens}) > 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("architecture", ["qwen2_vl", "qwen2_5_vl"])
def test_graphed_decode_on_the_tiny_parity_checkpoints(architecture, tmp_path):
    from tests.tiny_checkpoints import make_tiny_checkpoint
    from tests.tiny_tokenizer import write_tiny_tokenizer

    path = make_tiny_checkpoint(tmp_path / architecture, architecture, seed=11)
    write_tiny_tokenizer(path)
    prompts = _prompts(np.random.default_rng(9), 6)
    graphed, runner = _generate(str(path), prompts, attention_backend="triton", cuda_graph_sizes=SIZES)
    assert runner.num_graphed_steps > 0
    eager, _ = _generate(str(path), prompts, attention_backend="triton", enforce_eager=True)
    assert graphed == eager


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphs_captured_and_replayed_on_side_streams_give_the_same_tokens():
    from spaceserve.runtime.multiplex import ExecutionLayout
    from spaceserve.runtime.sm_partition import SMPartition
    from spaceserve.runtime.runner_setup import build_runners

    prompts = _prompts(np.random.default_rng(3), 5)
    expected, _ = _generate("tiny-qwen2-vl", prompts, attention_backend="triton", cuda_graph_sizes=SIZES)
    llm = make_llm("tiny-qwen2-vl", max_model_len=512, max_num_seqs=8, dtype="float32", attention_backend="triton",
                   enforce_eager=True)
    engine = llm.llm_engine
    side, other = torch.cuda.Stream(), torch.cuda.Stream()
    config = dataclasses.replace(engine.config, enforce_eager=False, cuda_graph_sizes=SIZES, vision_cuda_graphs=False)
    split = SMPartition(encoder_sms=0, lm_sms=0, total_sms=0, encoder_stream=other, lm_stream=other)  # its LM side
    layout = ExecutionLayout("time", "time", "test", lm_stream=side, partitions=(split,))
    runner, _, plan = build_runners(config, engine.core.model, engine.core.dtype, engine.core.device, layout)
    assert plan.num_kv_blocks == engine.core.num_kv_blocks
    assert runner.stream == side and runner.cuda_graphs.stream == side
    engine.core.model_runner = runner
    launch = runner.launch
    streams_used = []

    def launch_alternating(scheduled, encoder_outputs):  # switch graph sets between steps, as space mode does
        runner.use_stream(other if len(streams_used) % 2 else side)
        streams_used.append(runner.cuda_graphs.stream)
        return launch(scheduled, encoder_outputs)

    runner.launch = launch_alternating
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert runner.num_graphed_steps > 0 and set(streams_used) == {side, other}
    assert tokens == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_graphed_decode_launch_never_synchronises_the_host():
    llm = make_llm("tiny-qwen2-vl", max_model_len=256, max_num_seqs=8, attention_backend="triton", cuda_graph_sizes=SIZES)
    engine = llm.llm_engine
    runner = engine.core.model_runner
    launch = runner.launch
    checked = []

    def launch_without_sync(scheduled, encoder_outputs):
        graphable = all(s.num_scheduled_tokens == 1 for s in scheduled.sequences)
        if graphable:
            torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(scheduled, encoder_outputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            checked.append(graphable)

    runner.launch = launch_without_sync
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=3, min_tokens=3, max_tokens=6)]
    llm.generate(["a graphed step", "another one here"], params)
    assert any(checked) and runner.num_graphed_steps > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_profiled_memory_plan_sizes_the_kv_cache_from_what_is_left():
    from spaceserve import LLM

    utilization = 0.5
    gc.collect()  # engines of earlier tests in this process must not count against this one
    torch.cuda.empty_cache()
    llm = LLM("tiny-qwen2-vl", max_model_len=2048, max_num_batched_tokens=2048, max_num_seqs=16,
              gpu_memory_utilization=utilization)
    engine = llm.llm_engine
    plan = engine.core.memory_plan
    assert plan.source == "profiled" and plan.lm_peak_bytes > 0
    # every encoder batch fits the largest vision bucket, so its graphs are reserved instead of the eager peak
    assert plan.vision_graph_bytes > 0 and plan.encoder_peak_bytes == 0
    assert plan.cuda_graph_bytes > 0 and engine.core.model_runner.cuda_graphs is not None
    # what other users of the GPU (and the CUDA context) hold is not ours to plan with
    left = int(plan.total_bytes * utilization) - plan.non_torch_bytes - plan.weights_bytes - plan.peak_activation_bytes
    assert abs(plan.kv_cache_bytes - left) <= 0.05 * left
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": random_prompt(rng, 0, text_len=1500)}] + _prompts(rng, 12)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    free, total = torch.cuda.mem_get_info()
    # the whole process stays within the share it was given (plus 2% for allocator rounding)
    assert total - free <= total * utilization * 1.02 + plan.non_torch_bytes


def test_a_model_that_cannot_fit_is_a_config_error_before_anything_runs():
    with pytest.raises(ConfigError, match="fewer than one sequence"):
        make_llm("tiny-qwen2-vl", max_model_len=512, kv_cache_memory_bytes=1000)


class ReplayWithoutGraphs(DecodeCUDAGraphs):
    """Runs what a graph of each size captured, eagerly, through the views taken at 'capture' time: checks on CPU
    that padded decode steps give the same tokens and that a step's inputs land where the graph reads them."""

    def __init__(self, forward, input_batch, sizes, vocab_size):
        self.forward, self.input_batch, self.sizes, self.stream = forward, input_batch, tuple(sorted(sizes)), None
        self.logits = torch.empty(self.sizes[-1], vocab_size)
        self.replayed: list[int] = []

    def capture(self):
        from spaceserve.core.scheduler_output import SchedulerOutput

        self._inputs = {size: self.input_batch.prepare(SchedulerOutput(()), pad_to=size) for size in self.sizes}

    def replay(self, size):
        self.replayed.append(size)
        self.logits[:size].copy_(self.forward(self._inputs[size]))
        return self.logits[:size]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU stand-in for graphs; the GPU tests run real ones")
def test_padded_decode_through_capture_time_views_equals_the_torch_reference_on_cpu():
    prompts = _prompts(np.random.default_rng(4), 3)
    reference, _ = _generate("tiny-qwen2-vl", prompts, attention_backend="torch")
    llm = make_llm("tiny-qwen2-vl", max_model_len=512, max_num_seqs=8, dtype="float32", attention_backend="triton")
    runner = llm.llm_engine.core.model_runner
    graphs = ReplayWithoutGraphs(runner._decode_logits, runner.input_batch, (2, 4), runner.vocab_size)
    graphs.capture()
    runner.cuda_graphs = graphs
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert 4 in graphs.replayed and runner.num_graphed_steps > 0
    assert tokens == reference
