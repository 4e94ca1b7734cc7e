"""The floor arithmetic against the real modules: parameter counts of models built on the meta device, FLOPs counted
by torch's FlopCounterMode while the tiny models run on CPU, attention segments as the towers lay them out, and
hand counts for the published shapes."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from spaceserve.layers.attention import TorchAttentionBackend, build_attention_metadata
from spaceserve.models.loader import build_model
from spaceserve.models.qwen2_5_vl.vision import window_layout
from spaceserve.models.registry import model_class_for
from spaceserve.models.resolve import resolve_model
from spaceserve.models.vision_common import frame_cu_seqlens
from spaceserve.profile import floors
from spaceserve.runtime.kv_cache import kv_bytes_per_block

REAL = ["Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-7B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct"]
TINY = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]


def _config(name):
    return resolve_model(name).model_config


def _tiny_model(name):
    return build_model(_config(name), directory=None, load_format="dummy", dtype=torch.float32, device=torch.device("cpu"))


@pytest.mark.parametrize("name", REAL + TINY)
def test_decode_weight_bytes_are_the_lm_parameters_minus_the_unread_embedding_rows(name):
    config = _config(name)
    with torch.device("meta"):
        lm = model_class_for(config)(config).language_model
    text = config.text
    table = text.vocab_size * text.hidden_size
    body = sum(p.numel() for p in lm.parameters()) - table * (1 if text.tie_word_embeddings else 2)
    batch = random.randint(1, 300)
    expected = (body + batch * text.hidden_size + table) * 2
    assert floors.decode_weight_bytes(text, batch, dtype_bytes=2) == expected
    per_layer = sum(p.numel() for p in lm.layers[0].parameters())
    assert floors.lm_layer_parameters(text) == per_layer
    matmul = sum(m.weight.numel() for m in lm.layers[0].modules() if isinstance(m, torch.nn.Linear))
    assert floors.lm_layer_matmul_weights(text) == matmul


def test_decode_bytes_hand_count_qwen2_vl_7b():
    text = _config("Qwen/Qwen2-VL-7B-Instruct").text
    # 28 layers x (K + V) x 4 kv heads x 128 head_dim x 2 bytes
    assert floors.kv_bytes_per_token(text, 2) == 28 * 2 * 4 * 128 * 2 == 57344
    traffic = floors.uniform_decode_traffic(text, batch=16, context=4096, dtype_bytes=2)
    assert traffic.kv_read_bytes == 16 * 4096 * 57344
    assert traffic.kv_write_bytes == 16 * 57344
    assert traffic.floor_bytes == traffic.weight_bytes + traffic.kv_read_bytes
    assert traffic.floor_seconds(3.0e12) == pytest.approx(traffic.floor_bytes / 3.0e12)
    # untied: the 152064 x 3584 head read whole plus 16 embedding rows
    layer = 3584 * (3584 + 2 * 512) + 3584 * 3584 + 3 * 3584 * 18944 + (3584 + 2 * 512) + 2 * 3584
    assert traffic.weight_bytes == (28 * layer + 3584 + 16 * 3584 + 152064 * 3584) * 2


@pytest.mark.parametrize("name", REAL + TINY)
def test_kv_bytes_agree_with_the_runtime_allocation(name):
    text = _config(name).text
    contexts = [random.randint(1, 5000) for _ in range(random.randint(1, 9))]
    traffic = floors.decode_traffic(text, contexts, dtype_bytes=2)
    per_token = kv_bytes_per_block(text, 16, torch.bfloat16) // 16
    assert traffic.kv_read_bytes == sum(contexts) * per_token


def test_causal_attended_keys_by_enumeration():
    for _ in range(20):
        new, cached = random.randint(1, 40), random.randint(0, 40)
        enumerated = sum(1 for i in range(new) for key in range(cached + new) if key <= cached + i)
        assert floors.causal_attended_keys(new, cached) == enumerated


@pytest.mark.parametrize("name", TINY)
def test_prefill_linear_flops_match_the_flop_counter(name):
    """The counter's mm/addmm are the projections and the head; the reference backend's masked attention (bmm,
    when CPU SDPA takes its math path) computes the full rectangle and is checked by enumeration instead."""
    model = _tiny_model(name)
    lm, text = model.language_model, model.config.text
    block_size, cached, new = 4, random.randint(0, 12), random.randint(1, 12)
    total = cached + new
    num_blocks = -(-total // block_size)
    block_ids = random.sample(range(num_blocks + 3), num_blocks)
    kv = [torch.randn(2, num_blocks + 3, block_size, text.num_key_value_heads, text.head_dim) for _ in lm.layers]
    metadata = build_attention_metadata([new], [total], [block_ids], block_size, torch.device("cpu"))
    embeds = torch.randn(new, text.hidden_size)
    positions = torch.arange(cached, total).expand(3, -1)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        hidden = lm(embeds, positions, kv, metadata, TorchAttentionBackend())
        lm.compute_logits(hidden[-1:])
    flops = floors.prefill_flops(text, new, cached, num_sampled_rows=1)
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert by_op.get("aten.mm", 0) + by_op.get("aten.addmm", 0) == flops.linear + flops.lm_head, by_op
    q_width = text.num_attention_heads * text.head_dim
    assert flops.attention == text.num_hidden_layers * 4 * q_width * floors.causal_attended_keys(new, cached)


def test_prefill_flops_hand_count_qwen2_vl_7b_8192_on_8192_prefix():
    text = _config("Qwen/Qwen2-VL-7B-Instruct").text
    flops = floors.prefill_flops(text, 8192, 8192)
    matmul_per_layer = 3584 * (3584 + 1024) + 3584 * 3584 + 3 * 3584 * 18944
    assert flops.linear == 2 * 28 * matmul_per_layer * 8192
    assert flops.attention == 28 * 4 * 3584 * (8192 * 8192 + 8192 * 8193 // 2)
    assert flops.lm_head == 2 * 152064 * 3584


def _random_grids(merge: int, count: int) -> list[tuple[int, int, int]]:
    return [(random.randint(1, 2), merge * random.randint(1, 9), merge * random.randint(1, 9)) for _ in range(count)]


@pytest.mark.parametrize("name", TINY)
def test_vision_linear_flops_match_the_flop_counter(name):
    model = _tiny_model(name)
    vision = model.config.vision
    grids = _random_grids(vision.spatial_merge_size, random.randint(1, 3))
    patches = sum(t * h * w for t, h, w in grids)
    pixels = torch.randn(patches, vision.patch_dim)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.encode_images(pixels, torch.tensor(grids))
    flops = floors.vision_flops(model.config, grids)
    assert counter.get_total_flops() == flops.patch_embed + flops.linear + flops.merger, grids


@pytest.mark.parametrize("name", TINY)
def test_vision_attention_segments_match_the_towers_layout(name):
    config = _config(name)
    vision = config.vision
    grids = _random_grids(vision.spatial_merge_size, random.randint(1, 4))
    frames = frame_cu_seqlens(torch.tensor(grids)).diff().tolist()
    assert floors.frame_segment_lengths(grids) == frames, grids
    if vision.window_size:
        windows = window_layout(torch.tensor(grids), vision)[1].diff().tolist()
        assert floors.window_segment_lengths(vision, grids) == windows, grids
    squares = {
        "full": sum(n * n for n in frames),
        "window": sum(n * n for n in (windows if vision.window_size else frames)),
    }
    full_blocks = set(vision.fullatt_block_indexes) if vision.window_size else set(range(vision.depth))
    expected = sum(4 * vision.hidden_size * squares["full" if b in full_blocks else "window"] for b in range(vision.depth))
    assert floors.vision_flops(config, grids).attention == expected


def test_vision_flops_hand_count_qwen2_vl_7b_at_1344():
    config = _config("Qwen/Qwen2-VL-7B-Instruct")
    grid = floors.image_grid(1344, 1344, config.vision)
    assert grid == (1, 96, 96)
    flops = floors.vision_flops(config, [grid])
    n, d = 9216, 1280
    assert flops.patch_embed == 2 * n * 1176 * d
    assert flops.linear == 2 * 32 * (4 * d * d + 2 * d * 4 * d) * n
    assert flops.attention == 32 * 4 * d * n * n
    assert flops.merger == 2 * (n // 4) * (5120 * 5120 + 5120 * 3584)


def test_bad_arguments_are_rejected():
    text = _config("tiny-qwen2-vl").text
    with pytest.raises(ValueError):
        floors.decode_traffic(text, [], 2)
    with pytest.raises(ValueError):
        floors.prefill_flops(text, 0)
    with pytest.raises(ValueError):
        floors.image_grid(1000, 1344, _config("tiny-qwen2-vl").vision)
