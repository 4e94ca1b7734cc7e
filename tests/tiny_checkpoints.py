"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints written by transformers, for parity tests.

The weights are perturbed well away from transformers' init (std 0.02, unit norms, zero biases) so greedy
decoding produces varied tokens and every tensor influences the output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

import torch

PRESETS = Path(__file__).resolve().parents[1] / "spaceserve" / "models" / "presets"
PRESET_BY_ARCHITECTURE = {"qwen2_vl": "tiny-qwen2-vl", "qwen2_5_vl": "tiny-qwen2.5-vl"}
ARCHITECTURE_BY_HF_NAME = {
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
}
WEIGHT_NOISE_STD = 0.2
# The tiny models are ~0.3-0.6 MB in float32, so this yields 3-6 shards.
SHARD_SIZE = "120KB"

Architecture = Literal["qwen2_vl", "qwen2_5_vl"]


def preset_config(architecture: Architecture) -> dict[str, Any]:
    return json.loads((PRESETS / PRESET_BY_ARCHITECTURE[architecture] / "config.json").read_text())


def _transformers_classes(architecture: Architecture) -> tuple[type, type]:
    import transformers

    if architecture == "qwen2_vl":
        return transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    return transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration


def make_tiny_checkpoint(
    path: Path,
    architecture: Architecture,
    seed: int,
    *,
    sharded: bool = False,
    nested_text_config: bool = False,
) -> Path:
    """Write a seeded, perturbed float32 checkpoint to ``path`` and return it.

    Weight names are what transformers 5.17 save_pretrained writes (``visual.*``, ``model.*``, ``lm_head.*``).
    ``nested_text_config`` keeps transformers' own config.json layout (LM fields under ``text_config``);
    otherwise the LM fields are flattened to the top level like the published Qwen2-VL-2B-Instruct.
    """
    config_class, model_class = _transformers_classes(architecture)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_class(config_class(**preset_config(architecture))).float().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.add_(torch.randn(param.shape, generator=generator) * WEIGHT_NOISE_STD)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # transformers 5 always writes safetensors (there is no safe_serialization switch any more).
    model.save_pretrained(path, max_shard_size=SHARD_SIZE if sharded else "50GB")
    if not nested_text_config:
        config_file = path / "config.json"
        config_file.write_text(json.dumps(flatten_text_config(json.loads(config_file.read_text())), indent=2))
    preset = PRESETS / PRESET_BY_ARCHITECTURE[architecture]
    shutil.copyfile(preset / "preprocessor_config.json", path / "preprocessor_config.json")
    return path


def flatten_text_config(nested: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 config.json -> the flat layout of the Qwen2-VL-2B-Instruct Hub release."""
    flat = {key: value for key, value in nested.items() if key != "text_config"}
    text = dict(nested.get("text_config") or {})
    for key in ("model_type", "dtype", "layer_types"):
        text.pop(key, None)
    rope = dict(text.pop("rope_parameters", None) or {})
    flat.update(text)
    flat["rope_theta"] = rope.pop("rope_theta", 1_000_000.0)
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    flat["torch_dtype"] = flat.pop("dtype", "float32")
    return flat


def load_reference_model(path: Path, attn_implementation: str = "eager") -> torch.nn.Module:
    """The transformers model stored at ``path``, float32, eval mode."""
    hf_architecture = json.loads((Path(path) / "config.json").read_text())["architectures"][0]
    _, model_class = _transformers_classes(ARCHITECTURE_BY_HF_NAME[hf_architecture])
    model = model_class.from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation)
    return model.eval()
