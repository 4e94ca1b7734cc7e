"""Qwen2-VL and Qwen2.5-VL: a vision tower feeding image embeddings into the Qwen2 language model."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from spaceserve.models.config import ModelConfig
from spaceserve.models.qwen2_vl.language import Qwen2LanguageModel
from spaceserve.models.vision_common import vision_weight_name
from spaceserve.runtime.parallel_state import building_vision_tower

# Published checkpoints name the LM `model.*`; transformers 4.52-4.57 saved `model.language_model.*`. Both load.
_LANGUAGE_PREFIXES = ("model.language_model.", "model.")


class Qwen2VLForConditionalGeneration(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        with building_vision_tower():  # the tp group in the weights mode, a single rank in the data mode
            self.visual = self._build_vision_tower(config)
        self.language_model = Qwen2LanguageModel(config.text)

    @staticmethod
    def _build_vision_tower(config: ModelConfig) -> nn.Module:
        from spaceserve.models.qwen2_vl.vision import Qwen2VisionTransformer

        return Qwen2VisionTransformer(config.vision)

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Patches of several images -> their embedding rows, concatenated in order."""
        return self.visual(pixel_values.to(self.visual_dtype), grid_thw)

    @property
    def visual_dtype(self) -> torch.dtype:
        return next(self.visual.parameters()).dtype

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        vision: list[tuple[str, torch.Tensor]] = []
        language: list[tuple[str, torch.Tensor]] = []
        for name, tensor in weights:
            if name.startswith("lm_head."):
                language.append((name, tensor))
                continue
            vision_name = vision_weight_name(name)
            if vision_name is not None:
                vision.append((vision_name, tensor))
                continue
            prefix = next((p for p in _LANGUAGE_PREFIXES if name.startswith(p)), None)
            if prefix is None:
                raise KeyError(f"checkpoint tensor {name!r} belongs to neither the vision tower nor the language model")
            language.append((name[len(prefix) :], tensor))
        loaded = {f"visual.{n}" for n in self.visual.load_weights(vision)}
        loaded |= {f"language_model.{n}" for n in self.language_model.load_weights(language)}
        return loaded

    def expected_weight_names(self) -> set[str]:
        vision = {f"visual.{n}" for n, _ in self.visual.named_parameters()}
        return vision | {f"language_model.{n}" for n in self.language_model.expected_checkpoint_names()}


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    @staticmethod
    def _build_vision_tower(config: ModelConfig) -> nn.Module:
        from spaceserve.models.qwen2_5_vl.vision import Qwen2_5_VisionTransformer

        return Qwen2_5_VisionTransformer(config.vision)
