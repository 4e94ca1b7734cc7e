"""Build a model on its device and fill it from safetensors (single file or sharded with an index) or randomly.

Tensor-parallel ranks build their shard of the model (inside `parallel_state.building_model`) and read only their
slices of each checkpoint tensor: tensors are handed to the model as safetensors slices, which read the bytes a
rank asks for and nothing else. Dummy weights are generated per shard as the same slice of the unsharded dummy
model, so every tensor-parallel size runs the same random model.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from spaceserve.core.errors import ConfigError
from spaceserve.layers.linear import ShardLayout, shard_layout
from spaceserve.models.config import ModelConfig
from spaceserve.models.registry import model_class_for
from spaceserve.runtime.parallel_state import ModelParallel, building_model

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


def iter_checkpoint(directory: Path) -> Iterator[tuple[str, Any]]:
    """(name, safetensors slice) of every tensor: indexing a slice (`[a:b]`, `[:, a:b]`, `[:]`) reads only those
    bytes from the memory-mapped file (the slice keeps it mapped), so each rank reads just its shard."""
    files = safetensors_files(directory)
    if not files:
        raise ConfigError(f"{directory} holds no *.safetensors weights; use load_format='dummy' for random weights")
    for file in tqdm(files, desc="Loading safetensors checkpoint shards", unit="shard", dynamic_ncols=True):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_slice(name)


def build_model(
    model_config: ModelConfig,
    *,
    directory: Path | None,
    load_format: str,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    parallel: ModelParallel | None = None,
) -> nn.Module:
    """The model, or this rank's shard of it when `parallel` names tensor-parallel groups."""
    model_cls = model_class_for(model_config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), building_model(parallel or ModelParallel.single()):
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


_DUMMY_CHUNK_ELEMENTS = 1 << 22


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights of the real shapes and dtype: the same bytes and FLOPs as the published model. Generated on
    the model's device, so real-size models initialise quickly; norm scales sit around 1.

    Values depend only on (seed, parameter name, position in the unsharded parameter): each parameter is drawn in
    chunks of whole unsharded rows, each chunk from a generator seeded by its index, and a rank draws only the
    chunks its shard's rows fall in (keeping its columns of them), so a shard equals the slice of the unsharded
    dummy model and no rank ever holds a whole parameter."""
    norm_scales = {
        id(m.weight) for m in model.modules() if isinstance(m, nn.LayerNorm) or type(m).__name__ == "RMSNorm"
    }
    for name, param in model.named_parameters():
        _fill_dummy(param, shard_layout(param), _name_key(seed, name))
        if id(param) in norm_scales:
            param.add_(1.0)


def _name_key(seed: int, name: str) -> int:
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode()) * 0x85EBCA77) % (1 << 62)


def _fill_dummy(param: torch.Tensor, layout: ShardLayout, key: int) -> None:
    full_rows = layout.full_shape[0] if layout.full_shape else 1
    row_elements = param.numel() // max(1, param.shape[0] if param.dim() else 1)
    full_cols = int(torch.Size(layout.full_shape[1:]).numel())
    chunk_rows = max(1, _DUMMY_CHUNK_ELEMENTS // max(1, full_cols))
    local = param.view(-1, row_elements) if param.dim() else param.view(1, 1)
    generator = torch.Generator(device=param.device)
    row = 0
    for start, length in layout.row_runs:
        for chunk in range(start // chunk_rows, -(-(start + length) // chunk_rows)):
            lo, hi = chunk * chunk_rows, min((chunk + 1) * chunk_rows, full_rows)
            generator.manual_seed(key + chunk)
            values = torch.empty(hi - lo, full_cols, dtype=param.dtype, device=param.device)
            values.uniform_(-0.05, 0.05, generator=generator)
            take_lo, take_hi = max(lo, start), min(hi, start + length)
            rows = values[take_lo - lo : take_hi - lo]
            if layout.col_range is not None:
                rows = rows[:, layout.col_range[0] : layout.col_range[1]]
            local[row : row + take_hi - take_lo].copy_(rows)
            row += take_hi - take_lo
    local[row:].zero_()  # vocabulary padding past the last token
