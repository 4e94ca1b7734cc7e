"""The tiny checkpoint factory writes loadable, varied, transformers-layout checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from spaceserve.models.config import QWEN2_5_VL, QWEN2_VL, ModelConfig
from tests.tiny_checkpoints import load_reference_model, make_tiny_checkpoint

pytest.importorskip("transformers")

ARCHITECTURES = ["qwen2_vl", "qwen2_5_vl"]
HF_NAMES = {"qwen2_vl": QWEN2_VL, "qwen2_5_vl": QWEN2_5_VL}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_single_file_checkpoint(tmp_path: Path, architecture: str) -> None:
    path = make_tiny_checkpoint(tmp_path / "ckpt", architecture, seed=0)
    for name in ("config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json"):
        assert (path / name).is_file(), name
    assert not (path / "model.safetensors.index.json").exists()
    names = set(_tensors(path))
    assert "visual.patch_embed.proj.weight" in names and "model.embed_tokens.weight" in names
    assert all(name.split(".")[0] in ("visual", "model", "lm_head") for name in names)
    # Qwen2-VL ties lm_head to the embeddings, so the checkpoint omits it.
    assert ("lm_head.weight" in names) == (architecture == "qwen2_5_vl")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_sharded_checkpoint_has_index_covering_all_shards(tmp_path: Path, architecture: str) -> None:
    single = make_tiny_checkpoint(tmp_path / "single", architecture, seed=3)
    sharded = make_tiny_checkpoint(tmp_path / "sharded", architecture, seed=3, sharded=True)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) >= 3 and "model.safetensors" not in shards
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map.values()) == set(shards)
    single_tensors, sharded_tensors = _tensors(single), _tensors(sharded)
    assert set(weight_map) == set(sharded_tensors) == set(single_tensors)
    assert all(torch.equal(single_tensors[name], sharded_tensors[name]) for name in single_tensors)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_flat_and_nested_configs_describe_the_same_model(tmp_path: Path, architecture: str) -> None:
    flat = make_tiny_checkpoint(tmp_path / "flat", architecture, seed=5)
    nested = make_tiny_checkpoint(tmp_path / "nested", architecture, seed=5, nested_text_config=True)
    flat_raw = json.loads((flat / "config.json").read_text())
    nested_raw = json.loads((nested / "config.json").read_text())
    assert "text_config" not in flat_raw and flat_raw["hidden_size"] == 64
    assert "hidden_size" not in nested_raw and nested_raw["text_config"]["hidden_size"] == 64
    flat_config, nested_config = ModelConfig.from_hf_dict(flat_raw), ModelConfig.from_hf_dict(nested_raw)
    assert flat_config == nested_config
    assert flat_config.architecture == HF_NAMES[architecture]
    assert flat_config.torch_dtype == "float32"

    # transformers reads both layouts back to the same model.
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        flat_logits = load_reference_model(flat)(input_ids=ids).logits
        nested_logits = load_reference_model(nested)(input_ids=ids).logits
    torch.testing.assert_close(flat_logits, nested_logits, rtol=0, atol=0)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_reference_model_loads_every_weight_and_generates_varied_tokens(tmp_path: Path, architecture: str) -> None:
    path = make_tiny_checkpoint(tmp_path / "ckpt", architecture, seed=11, sharded=True)
    model = load_reference_model(path)
    assert not model.training and model.dtype == torch.float32
    stored = _tensors(path)
    state = model.state_dict()
    assert torch.equal(state["model.visual.patch_embed.proj.weight"], stored["visual.patch_embed.proj.weight"])
    assert torch.equal(state["model.language_model.norm.weight"], stored["model.norm.weight"])
    prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        output = model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    generated = output[0, prompt.shape[1] :].tolist()
    assert len(generated) == 20 and len(set(generated)) >= 5, generated


def test_seed_determines_weights(tmp_path: Path) -> None:
    first = _tensors(make_tiny_checkpoint(tmp_path / "a", "qwen2_vl", seed=1))
    again = _tensors(make_tiny_checkpoint(tmp_path / "b", "qwen2_vl", seed=1))
    other = _tensors(make_tiny_checkpoint(tmp_path / "c", "qwen2_vl", seed=2))
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
