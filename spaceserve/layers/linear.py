"""Tensor-parallel linear layers (Megatron's split, named as vLLM names them).

- Column-parallel: each rank holds a slice of the output features (rows of the weight) and computes them; no
  communication. `MergedColumnParallelLinear` packs several such projections (gate and up), `QKVParallelLinear`
  the q, k and v projections split by heads; with fewer KV heads than ranks each KV head is replicated on
  tp / kv_heads consecutive ranks.
- Row-parallel: each rank holds a slice of the input features (columns of the weight), multiplies its slice of
  a column-parallel layer's output, and the partial sums are all-reduced; the bias is added once, after.

Every parameter knows which slice of the unsharded parameter it holds (`ShardLayout`): the weight loader reads
exactly that slice from a checkpoint tensor (a safetensors slice reads only those bytes), dummy weights are
generated so that the shard equals the same slice of the unsharded dummy model, and tests compare the two.
With one rank every layer computes exactly what `nn.Linear` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from spaceserve.runtime.parallel_state import GroupCoordinator, current_tp_group

WeightLoader = Callable[..., None]


@dataclass(frozen=True)
class ShardLayout:
    """Where a local parameter sits in the unsharded one: its rows are the unsharded rows of `row_runs` ((start,
    length) each, concatenated in order) followed by `pad_rows` zero rows, and its columns (dim 1) are
    `col_range` (start, stop) of the unsharded columns, or all of them."""

    full_shape: tuple[int, ...]
    row_runs: tuple[tuple[int, int], ...]
    col_range: tuple[int, int] | None = None
    pad_rows: int = 0

    @classmethod
    def whole(cls, shape: tuple[int, ...]) -> ShardLayout:
        return cls(tuple(shape), ((0, shape[0] if shape else 1),))

    def slice_of(self, full: torch.Tensor) -> torch.Tensor:
        """This shard cut from the unsharded tensor (what the rank should hold)."""
        rows = torch.cat([full[start : start + length] for start, length in self.row_runs])
        if self.col_range is not None:
            rows = rows[:, self.col_range[0] : self.col_range[1]]
        if self.pad_rows:
            rows = torch.cat([rows, rows.new_zeros((self.pad_rows, *rows.shape[1:]))])
        return rows


def set_shard(param: nn.Parameter, layout: ShardLayout, loader: WeightLoader) -> None:
    param.shard_layout = layout  # type: ignore[attr-defined]
    param.weight_loader = loader  # type: ignore[attr-defined]


def shard_layout(param: torch.Tensor) -> ShardLayout:
    return getattr(param, "shard_layout", None) or ShardLayout.whole(tuple(param.shape))


# ---- reading checkpoint tensors: torch tensors or safetensors slices (read lazily) -------------------------------


def checkpoint_shape(loaded: Any) -> tuple[int, ...]:
    return tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else tuple(loaded.get_shape())


def read_rows(loaded: Any, start: int | None = None, stop: int | None = None, cols: tuple[int, int] | None = None):
    """loaded[start:stop, cols]; reads only that part of a safetensors slice."""
    rows = slice(start, stop)
    if cols is None:
        return loaded[rows]
    return loaded[rows, cols[0] : cols[1]]


def check_shape(name: str, expected: tuple[int, ...], got: tuple[int, ...]) -> None:
    if tuple(expected) != tuple(got):
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(got)}, the model expects {tuple(expected)}")


@torch.no_grad()
def default_weight_loader(param: nn.Parameter, loaded: Any, name: str = "") -> None:
    """A replicated parameter: the whole checkpoint tensor, cast to the parameter's dtype."""
    check_shape(name, tuple(param.shape), checkpoint_shape(loaded))
    param.copy_(read_rows(loaded))


def load_parameter(param: nn.Parameter, loaded: Any, name: str, shard_id: Any = None) -> None:
    loader = getattr(param, "weight_loader", None)
    if loader is None:
        if shard_id is not None:
            raise KeyError(f"checkpoint tensor {name!r} names a part of a parameter that has no parts")
        default_weight_loader(param, loaded, name)
    else:
        loader(param, loaded, name, shard_id)


# ---- layers ---------------------------------------------------------------------------------------------------


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


class LinearBase(nn.Linear):
    """A linear layer holding this rank's shard of the weight, shaped [local out, local in]. An nn.Linear, initialised
    as one (code looking for linear layers finds it, a tower built bare starts from the same values); a loader or
    the dummy initialiser fills it for serving."""

    def __init__(self, input_size: int, output_size: int, bias: bool, group: GroupCoordinator | None) -> None:
        nn.Module.__init__(self)
        self.group = group or current_tp_group()
        self.tp_rank, self.tp_size = self.group.rank, self.group.world_size
        self.in_features, self.out_features = input_size, output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, {self.group!r}"


class ColumnParallelLinear(LinearBase):
    """y[:, rank's slice] = x W_slice^T + b_slice. `output_sizes` packs several projections, each split on its own;
    their checkpoint tensors load one at a time (shard_id = the part's index) or together (shard_id None)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        group: GroupCoordinator | None = None,
        output_sizes: tuple[int, ...] | None = None,
    ) -> None:
        group = group or current_tp_group()
        sizes = tuple(output_sizes or (output_size,))
        if sum(sizes) != output_size:
            raise ValueError(f"output_sizes {sizes} do not add up to {output_size}")
        lengths = [_divide(size, group.world_size, "an output size") for size in sizes]
        self._init_shards(input_size, sizes, [(group.rank * n, n) for n in lengths], bias, group)

    def _init_shards(
        self,
        input_size: int,
        sizes: tuple[int, ...],
        shards: list[tuple[int, int]],
        bias: bool,
        group: GroupCoordinator,
    ) -> None:
        """sizes: each part's unsharded rows; shards: (start within the part, length) this rank holds of each."""
        super().__init__(input_size, sum(length for _, length in shards), bias, group)
        self.input_size = input_size
        self.output_sizes = sizes
        self.shards = tuple(shards)
        parts, full, local = [], 0, 0
        for size, (start, length) in zip(sizes, shards):
            parts.append((full + start, local, length))  # (unsharded row, local row, length)
            full += size
            local += length
        self.parts = tuple(parts)
        runs = tuple((row, length) for row, _, length in self.parts)
        set_shard(self.weight, ShardLayout((full, input_size), runs), self.weight_loader)
        if self.bias is not None:
            set_shard(self.bias, ShardLayout((full,), runs), self.weight_loader)

    def _part_index(self, shard_id: Any) -> int:
        return int(shard_id)

    @torch.no_grad()
    def weight_loader(self, param: nn.Parameter, loaded: Any, name: str = "", shard_id: Any = None) -> None:
        if shard_id is None:
            check_shape(name, (sum(self.output_sizes), *param.shape[1:]), checkpoint_shape(loaded))
            for row, local, length in self.parts:
                param[local : local + length].copy_(read_rows(loaded, row, row + length))
            return
        index = self._part_index(shard_id)
        check_shape(name, (self.output_sizes[index], *param.shape[1:]), checkpoint_shape(loaded))
        start, length = self.shards[index]
        local = self.parts[index][1]
        param[local : local + length].copy_(read_rows(loaded, start, start + length))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one matmul (gate_proj and up_proj)."""

    def __init__(
        self, input_size: int, output_sizes: tuple[int, ...], bias: bool = True, group: GroupCoordinator | None = None
    ) -> None:
        super().__init__(input_size, sum(output_sizes), bias, group, output_sizes=tuple(output_sizes))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v in one matmul, split by heads: rank r holds query heads [r*H/tp, (r+1)*H/tp) and, with at least as
    many KV heads as ranks, KV heads [r*KV/tp, ...); with fewer, KV head r // (tp/KV) alone. Checkpoint tensors come
    as q_proj / k_proj / v_proj (shard_id "q", "k", "v") or fused [q; k; v] (shard_id None: the vision tower's)."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = True,
        group: GroupCoordinator | None = None,
    ) -> None:
        group = group or current_tp_group()
        tp = group.world_size
        self.num_heads = _divide(num_heads, tp, "the number of attention heads")
        if num_kv_heads >= tp:
            self.num_kv_heads = _divide(num_kv_heads, tp, "the number of KV heads")
            kv_start = group.rank * self.num_kv_heads
        else:
            self.num_kv_heads = 1
            kv_start = group.rank // _divide(tp, num_kv_heads, "the tensor-parallel size over the KV heads")
        self.head_dim = head_dim
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        sizes = (num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim)
        shards = [
            (group.rank * self.q_size, self.q_size),
            (kv_start * head_dim, self.kv_size),
            (kv_start * head_dim, self.kv_size),
        ]
        self._init_shards(hidden_size, sizes, shards, bias, group)

    def _part_index(self, shard_id: Any) -> int:
        return "qkv".index(shard_id)


class RowParallelLinear(LinearBase):
    """y = all_reduce(x_slice W[:, slice]^T) + b: x arrives split along its features (a column-parallel layer's
    output); the bias is replicated and added once, after the sum."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = True, group: GroupCoordinator | None = None
    ) -> None:
        group = group or current_tp_group()
        local = _divide(input_size, group.world_size, "an input size")
        super().__init__(local, output_size, bias, group)
        start = self.tp_rank * local
        self.cols = (start, start + local)
        layout = ShardLayout((output_size, input_size), ((0, output_size),), col_range=self.cols)
        set_shard(self.weight, layout, self.weight_loader)

    @torch.no_grad()
    def weight_loader(self, param: nn.Parameter, loaded: Any, name: str = "", shard_id: Any = None) -> None:
        if shard_id is not None:
            raise KeyError(f"checkpoint tensor {name!r} names a part of a row-parallel layer")
        check_shape(name, (param.shape[0], self.input_size_full), checkpoint_shape(loaded))
        param.copy_(read_rows(loaded, cols=self.cols))

    @property
    def input_size_full(self) -> int:
        return self.weight.shape[1] * self.tp_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.linear(x, self.weight, self.bias)
        out = self.group.all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias
