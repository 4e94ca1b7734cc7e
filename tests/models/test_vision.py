"""Parity of the native vision towers with transformers' (random weights, float32, several odd grids)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spaceserve.core.errors import ConfigError, InvalidInputError
from spaceserve.models.config import ModelConfig
from spaceserve.models.qwen2_5_vl.vision import Qwen2_5_VisionTransformer, window_layout
from spaceserve.models.qwen2_vl.vision import Qwen2VisionTransformer
from spaceserve.layers.attention.varlen import build_varlen_segments, varlen_attention
from spaceserve.models.vision_common import vision_weight_name

transformers = pytest.importorskip("transformers")

PRESETS = Path(__file__).resolve().parents[2] / "spaceserve" / "models" / "presets"

# h and w are multiples of the merge size 2; t=2 exercises per-frame segments; [1,10,14] and [1,16,16] give
# Qwen2.5 several 4x4-unit windows, clipped edge windows and (16/2 = 8, a window multiple) the exact-fit case.
GRIDS = {
    "tiny-qwen2-vl": [[1, 6, 8], [1, 4, 10], [1, 12, 6], [2, 4, 6]],
    "tiny-qwen2.5-vl": [[1, 6, 8], [1, 10, 14], [1, 4, 10], [2, 12, 10], [1, 16, 16]],
}


def _reference_and_ours(preset: str) -> tuple[torch.nn.Module, torch.nn.Module, ModelConfig]:
    raw = json.loads((PRESETS / preset / "config.json").read_text())
    config = ModelConfig.from_hf_dict(raw)
    if preset == "tiny-qwen2-vl":
        hf_model = transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(**raw))
        ours: torch.nn.Module = Qwen2VisionTransformer(config.vision)
    else:
        hf_model = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**raw))
        ours = Qwen2_5_VisionTransformer(config.vision)
    reference = hf_model.model.visual.float().eval()
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        # Default init leaves norms at 1/0 and biases at 0; perturb everything so every weight matters.
        for param in reference.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    loaded = ours.load_weights(reference.state_dict().items())
    assert loaded == set(dict(ours.named_parameters()))
    return reference, ours.eval(), config


@pytest.mark.parametrize("preset", sorted(GRIDS))
def test_vision_tower_matches_transformers(preset: str) -> None:
    reference, ours, config = _reference_and_ours(preset)
    grid_thw = torch.tensor(GRIDS[preset], dtype=torch.int64)
    num_patches = int(grid_thw.prod(-1).sum())
    pixel_values = torch.randn(num_patches, config.vision.patch_dim, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = reference(pixel_values, grid_thw=grid_thw).pooler_output
        actual = ours(pixel_values, grid_thw)
    rows = int(grid_thw.prod(-1).sum()) // config.vision.spatial_merge_size**2
    assert actual.shape == (rows, config.vision.out_hidden_size)
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-5)


def test_items_are_independent_and_in_order() -> None:
    _, ours, config = _reference_and_ours("tiny-qwen2.5-vl")
    grids = GRIDS["tiny-qwen2.5-vl"]
    pixels = [torch.randn(t * h * w, config.vision.patch_dim) for t, h, w in grids]
    with torch.no_grad():
        together = ours(torch.cat(pixels), torch.tensor(grids))
        alone = [ours(p, torch.tensor([g])) for p, g in zip(pixels, grids)]
    torch.testing.assert_close(together, torch.cat(alone), atol=2e-5, rtol=1e-5)


def test_window_layout_covers_every_unit_once() -> None:
    config = ModelConfig.from_hf_dict(json.loads((PRESETS / "tiny-qwen2.5-vl" / "config.json").read_text()))
    order, cu = window_layout(torch.tensor([[1, 10, 14], [2, 16, 16]]), config.vision)
    total_units = (5 * 7) + 2 * (8 * 8)
    assert sorted(order.tolist()) == list(range(total_units))
    assert cu[-1].item() == total_units * 4
    # 5x7 units in 4x4 windows -> 2x2 windows of 16, 12, 4, 3 units; 8x8 units -> 4 full windows per frame.
    assert (cu.diff() // 4).tolist() == [16, 12, 4, 3] + [16] * 8


def test_varlen_attention_equals_block_diagonal_mask() -> None:
    generator = torch.Generator().manual_seed(3)
    cu_seqlens = torch.tensor([0, 5, 9, 14, 30, 31, 35])
    q, k, v = (torch.randn(35, 2, 8, generator=generator) for _ in range(3))
    segment = torch.repeat_interleave(torch.arange(6), cu_seqlens.diff())
    mask = segment[:, None] == segment[None, :]
    dense = F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (q, k, v)), attn_mask=mask)
    segments = build_varlen_segments(cu_seqlens.tolist(), head_dim=8, device=torch.device("cpu"), use_triton=False)
    torch.testing.assert_close(varlen_attention(q, k, v, segments), dense.transpose(0, 1))


def test_vision_weight_prefixes() -> None:
    assert vision_weight_name("visual.blocks.0.attn.qkv.weight") == "blocks.0.attn.qkv.weight"
    assert vision_weight_name("model.visual.merger.mlp.0.weight") == "merger.mlp.0.weight"
    assert vision_weight_name("model.layers.0.mlp.up_proj.weight") is None
    assert vision_weight_name("model.language_model.embed_tokens.weight") is None
    assert vision_weight_name("lm_head.weight") is None


def test_load_weights_rejects_unknown_names_and_shapes() -> None:
    config = ModelConfig.from_hf_dict(json.loads((PRESETS / "tiny-qwen2-vl" / "config.json").read_text()))
    tower = Qwen2VisionTransformer(config.vision)
    with pytest.raises(ConfigError, match="unknown vision tower weight 'blocks.9.attn.qkv.weight'"):
        tower.load_weights([("blocks.9.attn.qkv.weight", torch.randn(96, 32))])
    with pytest.raises(ConfigError, match="shape"):
        tower.load_weights([("blocks.0.attn.qkv.weight", torch.randn(32, 32))])
    assert tower.load_weights([("rotary_pos_emb.inv_freq", torch.randn(4))]) == set()


def test_load_weights_casts_to_parameter_dtype() -> None:
    config = ModelConfig.from_hf_dict(json.loads((PRESETS / "tiny-qwen2-vl" / "config.json").read_text()))
    tower = Qwen2VisionTransformer(config.vision).to(torch.bfloat16)
    weight = torch.randn(32, 3, 2, 14, 14, dtype=torch.float32)
    assert tower.load_weights([("patch_embed.proj.weight", weight)]) == {"patch_embed.proj.weight"}
    assert tower.patch_embed.proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(tower.patch_embed.proj.weight.float(), weight.bfloat16().float())


def test_rejects_grid_that_does_not_match_pixels() -> None:
    config = ModelConfig.from_hf_dict(json.loads((PRESETS / "tiny-qwen2-vl" / "config.json").read_text()))
    tower = Qwen2VisionTransformer(config.vision)
    with pytest.raises(InvalidInputError, match="grid_thw implies"):
        tower(torch.randn(10, config.vision.patch_dim), torch.tensor([[1, 4, 4]]))
    with pytest.raises(InvalidInputError, match="multiples of 2"):
        tower(torch.randn(15, config.vision.patch_dim), torch.tensor([[1, 3, 5]]))


@pytest.mark.parametrize("architecture", ["qwen2_vl", "qwen2_5_vl"])
def test_tower_loads_from_saved_checkpoint(tmp_path: Path, architecture: str) -> None:
    from safetensors.torch import load_file

    from tests.tiny_checkpoints import load_reference_model, make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "ckpt", architecture, seed=4, sharded=True)
    config = ModelConfig.from_hf_dict(json.loads((path / "config.json").read_text()))
    tower_class = Qwen2VisionTransformer if architecture == "qwen2_vl" else Qwen2_5_VisionTransformer
    tower = tower_class(config.vision).eval()
    checkpoint = {name: t for file in path.glob("*.safetensors") for name, t in load_file(file).items()}
    vision = [(vision_weight_name(name), t) for name, t in checkpoint.items() if vision_weight_name(name)]
    assert tower.load_weights(vision) == set(dict(tower.named_parameters()))

    grid_thw = torch.tensor([[1, 10, 14], [1, 4, 6]])
    pixel_values = torch.randn(int(grid_thw.prod(-1).sum()), config.vision.patch_dim)
    with torch.no_grad():
        expected = load_reference_model(path).model.visual(pixel_values, grid_thw=grid_thw).pooler_output
        torch.testing.assert_close(tower(pixel_values, grid_thw), expected, atol=2e-5, rtol=1e-5)
