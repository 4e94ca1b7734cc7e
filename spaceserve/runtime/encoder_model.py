"""The vision tower on its own, for the encoder process, and the core's model without one.

The encoder process needs only the tower (the LM's weights would double the device memory of the model), and
must hold exactly the core's weights, so that its embeddings equal those an in-process encoder computes. With
real weights it reads only the tower's tensors from the checkpoint; with dummy weights it draws the same random
values, because the full model builds its tower first and `init_dummy_weights` fills parameters in order from one
seeded generator per device, so the tower's parameters take the same first draws either way.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from spaceserve.core.errors import ConfigError
from spaceserve.models.config import ModelConfig
from spaceserve.models.loader import init_dummy_weights, safetensors_files
from spaceserve.models.registry import model_class_for
from spaceserve.models.vision_common import vision_weight_name


class VisionTowerModel(nn.Module):
    """The parts of a Qwen2-VL model the encoder runner and the vision graphs use: `config`, `visual`,
    `encode_images`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.visual = model_class_for(config)._build_vision_tower(config)

    @property
    def visual_dtype(self) -> torch.dtype:
        return next(self.visual.parameters()).dtype

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return self.visual(pixel_values.to(self.visual_dtype), grid_thw)


def build_vision_model(model_config: ModelConfig, *, directory: Path | None, load_format: str, dtype: torch.dtype,
                       device: torch.device, seed: int = 0) -> VisionTowerModel:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = VisionTowerModel(model_config)
    finally:
        torch.set_default_dtype(previous)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    elif load_format == "auto":
        if directory is None:
            raise ConfigError("no model directory to load the vision tower from; use load_format='dummy'")
        loaded = model.visual.load_weights(_vision_tensors(directory))
        missing = {name for name, _ in model.visual.named_parameters()} - loaded
        if missing:
            raise ConfigError(
                f"checkpoint in {directory} lacks {len(missing)} vision tensors, e.g. {sorted(missing)[:3]}"
            )
    else:
        raise ConfigError(f"unknown load_format {load_format!r}; use 'auto' or 'dummy'")
    return model.eval()


def _vision_tensors(directory: Path):
    files = safetensors_files(directory)
    if not files:
        raise ConfigError(f"{directory} holds no *.safetensors weights; use load_format='dummy' for random weights")
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                relative = vision_weight_name(name)
                if relative is not None:
                    yield relative, handle.get_tensor(name)


def release_vision_tower(model: nn.Module) -> None:
    """Drop the core's copy of the tower's weights (the encoder process has its own): its parameters move to the
    meta device, keeping their shapes and dtype for whatever reads them."""
    model.visual.to(torch.device("meta"))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
