"""Built-in presets carry the published shapes: our model has exactly as many parameters as transformers' model
built from the same config, and a real-size preset runs with dummy weights and no download."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from spaceserve.models.config import ModelConfig
from spaceserve.models.registry import model_class_for
from spaceserve.models.resolve import PRESETS_DIR, resolve_model

PUBLISHED = ["Qwen2-VL-2B-Instruct", "Qwen2-VL-7B-Instruct", "Qwen2-VL-72B-Instruct", "Qwen2.5-VL-3B-Instruct", "Qwen2.5-VL-7B-Instruct"]


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors count once


@pytest.mark.parametrize("name", PUBLISHED)
def test_preset_parameter_count_equals_transformers(name):
    raw = json.loads((PRESETS_DIR / name / "config.json").read_text())
    config = ModelConfig.from_hf_dict(raw)
    with torch.device("meta"):
        ours = model_class_for(config)(config)
        hf_config = transformers.AutoConfig.for_model(raw["model_type"], **{k: v for k, v in raw.items() if k != "model_type"})
        reference = getattr(transformers, config.architecture)(hf_config)
    assert count(ours) == count(reference)


@pytest.mark.parametrize("name", ["Qwen/Qwen2-VL-2B-Instruct", "Qwen2.5-VL-7B-Instruct", "tiny-qwen2-vl"])
def test_presets_resolve_by_hub_name_or_short_name(name):
    resolved = resolve_model(name)
    assert resolved.is_preset and not resolved.has_weights
    assert resolved.image_config.max_pixels > resolved.image_config.min_pixels
