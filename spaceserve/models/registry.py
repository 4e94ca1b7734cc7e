from __future__ import annotations

from torch import nn

from spaceserve.core.errors import ConfigError
from spaceserve.models.config import QWEN2_5_VL, QWEN2_VL, ModelConfig
from spaceserve.models.qwen2_vl.model import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    QWEN2_VL: Qwen2VLForConditionalGeneration,
    QWEN2_5_VL: Qwen2_5_VLForConditionalGeneration,
}


def model_class_for(config: ModelConfig) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[config.architecture]
    except KeyError:
        raise ConfigError(f"no model registered for architecture {config.architecture!r}") from None
