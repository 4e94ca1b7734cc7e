"""Build a model on its device and fill it from safetensors (single file or sharded with an index) or randomly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from spaceserve.core.errors import ConfigError
from spaceserve.models.config import ModelConfig
from spaceserve.models.registry import model_class_for

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str, model_config: ModelConfig) -> torch.dtype:
    name = model_config.torch_dtype if dtype == "auto" else dtype
    name = {"fp32": "float32", "half": "float16", "fp16": "float16", "bf16": "bfloat16", "float": "float32"}.get(
        name, name
    )
    if name not in _DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}; use auto, float32, float16 or bfloat16")
    return _DTYPES[name]


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({directory / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"{index} names shards that are missing: {missing}")
        return files
    return sorted(directory.glob("*.safetensors"))


def iter_checkpoint(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = safetensors_files(directory)
    if not files:
        raise ConfigError(f"{directory} holds no *.safetensors weights; use load_format='dummy' for random weights")
    for file in tqdm(files, desc="Loading safetensors checkpoint shards", unit="shard", dynamic_ncols=True):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def build_model(
    model_config: ModelConfig,
    *,
    directory: Path | None,
    load_format: str,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> nn.Module:
    model_cls = model_class_for(model_config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(model_config)
    finally:
        torch.set_default_dtype(previous)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    elif load_format == "auto":
        if directory is None:
            raise ConfigError("no model directory to load weights from; use load_format='dummy'")
        loaded = model.load_weights(iter_checkpoint(directory))
        missing = model.expected_weight_names() - loaded
        if missing:
            raise ConfigError(f"checkpoint in {directory} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    else:
        raise ConfigError(f"unknown load_format {load_format!r}; use 'auto' or 'dummy'")
    return model.eval()


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights of the real shapes and dtype: the same bytes and FLOPs as the published model. Generated on
    the model's device, so real-size models initialise quickly; norm scales sit around 1."""
    norm_scales = {
        id(m.weight) for m in model.modules() if isinstance(m, nn.LayerNorm) or type(m).__name__ == "RMSNorm"
    }
    generators: dict[torch.device, torch.Generator] = {}
    for param in model.parameters():
        generator = generators.setdefault(param.device, torch.Generator(device=param.device).manual_seed(seed))
        param.uniform_(-0.05, 0.05, generator=generator)
        if id(param) in norm_scales:
            param.add_(1.0)
