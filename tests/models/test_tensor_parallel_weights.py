"""Each tensor-parallel rank's shard equals its slice of the unsharded model, for checkpoint and dummy weights alike:
q/k/v and gate/up by rows (per part), o_proj/down_proj by columns, the vocabulary by rows with zero padding, KV
heads replicated when there are fewer than ranks, and the vision tower split only in the weights mode. Shards are
built in this process with a rank and size but no process group (loading needs no collectives)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from spaceserve import LLM
from spaceserve.core.errors import ConfigError
from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.layers.linear import shard_layout
from spaceserve.models.config import ModelConfig
from spaceserve.models.loader import build_model
from spaceserve.runtime.parallel_state import GroupCoordinator, ModelParallel
from tests.tiny_checkpoints import PRESETS, make_tiny_checkpoint

CPU = torch.device("cpu")


def _config(architecture: str, **text_overrides) -> ModelConfig:
    preset = "tiny-qwen2-vl" if architecture == "qwen2_vl" else "tiny-qwen2.5-vl"
    config = ModelConfig.from_hf_dict(json.loads((PRESETS / preset / "config.json").read_text()))
    return replace(config, text=replace(config.text, **text_overrides)) if text_overrides else config


def _build(config, rank=0, size=1, vision_split=True, directory: Path | None = None, seed=3):
    tp = GroupCoordinator(rank, size)
    parallel = ModelParallel(tp, tp if vision_split else GroupCoordinator.single("vision"))
    return build_model(
        config,
        directory=directory,
        load_format="auto" if directory is not None else "dummy",
        dtype=torch.float32,
        device=CPU,
        seed=seed,
        parallel=parallel if size > 1 else None,
    )


def _assert_shards_are_slices(full_model, shards, vision_split=True):
    full = dict(full_model.named_parameters())
    for rank, shard in enumerate(shards):
        for name, param in shard.named_parameters():
            expected = shard_layout(param).slice_of(full[name].detach())
            assert param.shape == expected.shape, f"rank {rank} {name}"
            torch.testing.assert_close(param, expected, rtol=0, atol=0, msg=f"rank {rank} {name}")
            if name.startswith("visual.") and not vision_split:
                assert param.shape == full[name].shape, f"the data mode keeps the whole tower: {name}"


@pytest.mark.parametrize("architecture", ["qwen2_vl", "qwen2_5_vl"])
def test_checkpoint_shards_equal_slices_of_the_full_weights(architecture, tmp_path):
    path = make_tiny_checkpoint(tmp_path / architecture, architecture, seed=7, sharded=True)
    config = ModelConfig.from_hf_dict(json.loads((path / "config.json").read_text()))
    full = _build(config, directory=path)
    shards = [_build(config, rank, 2, directory=path) for rank in range(2)]
    _assert_shards_are_slices(full, shards)
    lm = shards[1].language_model
    text = config.text
    attn = lm.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads) == (text.num_attention_heads // 2, text.num_key_value_heads // 2)
    assert lm.layers[0].mlp.down_proj.weight.shape == (text.hidden_size, text.intermediate_size // 2)
    assert lm.embed_tokens.weight.shape[0] == text.vocab_size // 2
    # the split covers everything: rank 0's and rank 1's o_proj columns side by side are the whole weight
    whole = torch.cat([s.language_model.layers[1].self_attn.o_proj.weight for s in shards], dim=1)
    torch.testing.assert_close(whole, full.language_model.layers[1].self_attn.o_proj.weight, rtol=0, atol=0)


def test_dummy_shards_equal_slices_of_the_unsharded_dummy_model():
    config = _config("qwen2_vl")
    full = _build(config)
    for size in (2, 4):  # 4 ranks > 2 KV heads: each KV head on two ranks (and 2 vision heads: the data mode)
        shards = [_build(config, rank, size, vision_split=size == 2) for rank in range(size)]
        _assert_shards_are_slices(full, shards, vision_split=size == 2)
    kv = [s.language_model.layers[0].self_attn.qkv_proj for s in shards]
    assert [p.num_kv_heads for p in kv] == [1, 1, 1, 1]
    k_rows = [p.weight[p.q_size : p.q_size + p.kv_size] for p in kv]
    torch.testing.assert_close(k_rows[0], k_rows[1], rtol=0, atol=0)  # ranks 0 and 1 share KV head 0
    assert not torch.equal(k_rows[1], k_rows[2])


def test_vocabulary_that_does_not_divide_is_padded_with_zero_rows():
    config = _config("qwen2_5_vl", vocab_size=317)  # untied head, 317 = 3 * 106 - 1
    full = _build(config)
    shards = [_build(config, rank, 2, vision_split=False) for rank in range(2)]
    _assert_shards_are_slices(full, shards, vision_split=False)
    last = shards[1].language_model
    for table in (last.embed_tokens, last.lm_head):
        assert table.weight.shape[0] == 159 and table.num_real_rows == 158
        assert not table.weight[-1].any()


def test_tensor_parallel_sizes_that_do_not_split_the_model_are_refused():
    with pytest.raises(ConfigError, match="does not divide the language model's 4 attention heads"):
        EngineArgs("tiny-qwen2-vl", tensor_parallel_size=3).create_engine_config()
    with pytest.raises(ConfigError, match="vision tower's attention heads"):
        EngineArgs("tiny-qwen2-vl", tensor_parallel_size=4).create_engine_config()  # 2 vision heads
    config = EngineArgs("tiny-qwen2-vl", tensor_parallel_size=4, mm_encoder_tp_mode="data").create_engine_config()
    assert config.parallel.tensor_parallel_size == 4
    if not torch.cuda.is_available():  # a CPU build refuses the device before counting GPUs
        with pytest.raises(ConfigError, match="no CUDA"):
            LLM("tiny-qwen2-vl", tensor_parallel_size=2, device="cuda")
    elif torch.cuda.device_count() < 2:
        with pytest.raises(ConfigError, match="needs 2 GPUs"):
            LLM("tiny-qwen2-vl", tensor_parallel_size=2, device="cuda")
