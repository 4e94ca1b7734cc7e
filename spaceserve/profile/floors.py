"""What a step must move and compute, counted from a ModelConfig: the arithmetic behind every floor the GPU report
compares against. Pure integer arithmetic: no torch, no device.

Decode is bandwidth-bound, so its floor is bytes over the measured copy bandwidth; prefill and the vision tower
are matrix-bound, so theirs are FLOPs over the measured matmul rate. Only matrix products count as FLOPs (2 per
multiply-add); norms, biases, activations and rotary embeddings are elementwise and left out, which makes every
FLOP figure slightly low and every achieved rate slightly pessimistic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from spaceserve.models.config import QWEN2_5_VL, ModelConfig, TextConfig, VisionConfig

Grid = tuple[int, int, int]


# ---- language model: parameters ------------------------------------------------------------------------------


def lm_layer_matmul_weights(text: TextConfig) -> int:
    """Weight elements of one decoder layer's matrix products (q/k/v, o, gate/up, down), biases excluded."""
    q = text.num_attention_heads * text.head_dim
    kv = text.num_key_value_heads * text.head_dim
    attention = text.hidden_size * (q + 2 * kv) + q * text.hidden_size
    mlp = 3 * text.hidden_size * text.intermediate_size
    return attention + mlp


def lm_layer_parameters(text: TextConfig) -> int:
    """Every parameter element of one decoder layer: the matmul weights, the q/k/v bias and the two RMSNorm scales."""
    qkv_bias = (text.num_attention_heads + 2 * text.num_key_value_heads) * text.head_dim
    return lm_layer_matmul_weights(text) + qkv_bias + 2 * text.hidden_size


# ---- decode: bytes -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeTraffic:
    """HBM traffic of one decode step (one new token for each of the batch's sequences)."""

    weight_bytes: int
    kv_read_bytes: int
    kv_write_bytes: int

    @property
    def floor_bytes(self) -> int:
        """What the issue's floor counts: weight bytes + KV bytes read. The new tokens' K/V writes (kv_write_bytes,
        under 0.1% of the total at every benchmarked size) are reported but not counted."""
        return self.weight_bytes + self.kv_read_bytes

    def floor_seconds(self, bandwidth_bytes_per_s: float) -> float:
        return self.floor_bytes / bandwidth_bytes_per_s


def decode_weight_bytes(text: TextConfig, batch: int, dtype_bytes: int) -> int:
    """LM weight bytes one decode step of `batch` sequences reads.

    Every decoder layer's parameters and the final norm are read whole. The embedding lookup reads only the
    looked-up rows: one per sequence (counted as `batch` rows, at most the vocabulary; duplicate token ids would
    read fewer). The head reads its whole [vocab, hidden] matrix because every sequence samples. With tied
    embeddings the head's matrix *is* the embedding table, and the looked-up rows are read twice, once at the start
    of the step and once at the end: a 0.2-1 GB table does not stay in a 50 MB L2 in between, so both reads reach
    HBM and both are counted.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    embedding_rows = min(batch, text.vocab_size) * text.hidden_size
    head = text.vocab_size * text.hidden_size
    elements = text.num_hidden_layers * lm_layer_parameters(text) + text.hidden_size + embedding_rows + head
    return elements * dtype_bytes


def kv_bytes_per_token(text: TextConfig, dtype_bytes: int) -> int:
    """K and V of one token across all layers."""
    return text.num_hidden_layers * 2 * text.num_key_value_heads * text.head_dim * dtype_bytes


def decode_traffic(text: TextConfig, context_lens: Sequence[int], dtype_bytes: int) -> DecodeTraffic:
    """One decode step over sequences whose context after the step is `context_lens[i]` tokens (the new token
    included: its query attends to all of them, so every one of those tokens' K/V is read)."""
    if not context_lens or min(context_lens) < 1:
        raise ValueError(f"context lengths must be a non-empty list of positive ints, got {list(context_lens)[:8]}")
    per_token = kv_bytes_per_token(text, dtype_bytes)
    return DecodeTraffic(
        weight_bytes=decode_weight_bytes(text, len(context_lens), dtype_bytes),
        kv_read_bytes=sum(context_lens) * per_token,
        kv_write_bytes=len(context_lens) * per_token,
    )


def uniform_decode_traffic(text: TextConfig, batch: int, context: int, dtype_bytes: int) -> DecodeTraffic:
    return decode_traffic(text, [context] * batch, dtype_bytes)


# ---- prefill: FLOPs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrefillFlops:
    linear: int
    """Decoder layers' matrix products: 2 x matmul weights x new tokens."""
    attention: int
    """QK^T and PV over the causal context each new token attends to (prefix included)."""
    lm_head: int
    """The head over the rows that sample (one for a chunk that ends the prompt, none for an earlier chunk)."""

    @property
    def total(self) -> int:
        return self.linear + self.attention + self.lm_head


def causal_attended_keys(num_new_tokens: int, num_cached_tokens: int) -> int:
    """Sum over the new tokens of the keys each attends to: token i (0-based in the chunk) sees the prefix and
    new tokens 0..i, so P + i + 1 keys; summed, N*P + N(N+1)/2."""
    n, p = num_new_tokens, num_cached_tokens
    return n * p + n * (n + 1) // 2


def prefill_flops(
    text: TextConfig, num_new_tokens: int, num_cached_tokens: int = 0, num_sampled_rows: int = 1
) -> PrefillFlops:
    if num_new_tokens < 1 or num_cached_tokens < 0 or num_sampled_rows < 0:
        raise ValueError("num_new_tokens must be >= 1, num_cached_tokens and num_sampled_rows >= 0")
    layers = text.num_hidden_layers
    q_width = text.num_attention_heads * text.head_dim
    return PrefillFlops(
        linear=2 * layers * lm_layer_matmul_weights(text) * num_new_tokens,
        attention=layers * 2 * 2 * q_width * causal_attended_keys(num_new_tokens, num_cached_tokens),
        lm_head=2 * text.vocab_size * text.hidden_size * num_sampled_rows,
    )


# ---- vision tower: FLOPs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionFlops:
    patch_embed: int
    linear: int
    """Every block's qkv, proj and MLP products."""
    attention: int
    """QK^T and PV, full (bidirectional) attention inside each segment: a frame, or a window on Qwen2.5-VL."""
    merger: int

    @property
    def total(self) -> int:
        return self.patch_embed + self.linear + self.attention + self.merger


def frame_segment_lengths(grids: Sequence[Grid]) -> list[int]:
    """Patches per attention segment when every frame attends to itself (Qwen2-VL; Qwen2.5-VL's full blocks)."""
    return [h * w for t, h, w in grids for _ in range(t)]


def window_segment_lengths(vision: VisionConfig, grids: Sequence[Grid]) -> list[int]:
    """Patches per window of Qwen2.5-VL's windowed blocks: each frame is tiled into windows of `side` x `side`
    merge units (side = window_size / (merge * patch_size)), the last row and column of windows clipped."""
    merge = vision.spatial_merge_size
    side = vision.window_size // (merge * vision.patch_size)
    if side < 1:
        raise ValueError(f"window_size {vision.window_size} is smaller than one merge unit")
    lengths = []
    for t, h, w in grids:
        units_h, units_w = h // merge, w // merge
        rows = [min(side, units_h - start) for start in range(0, units_h, side)]
        cols = [min(side, units_w - start) for start in range(0, units_w, side)]
        frame = [r * c * merge * merge for r in rows for c in cols]
        lengths.extend(frame * t)
    return lengths


def vision_flops(model: ModelConfig, grids: Sequence[Grid]) -> VisionFlops:
    """The vision tower over a batch of items with patch grids (t, h, w)."""
    vision = model.vision
    if not grids:
        raise ValueError("vision_flops needs at least one grid")
    patches = sum(t * h * w for t, h, w in grids)
    hidden, inter = vision.hidden_size, vision.intermediate_size
    gated = model.architecture == QWEN2_5_VL  # SwiGLU: gate, up and down; Qwen2-VL: fc1 and fc2
    mlp_weights = (3 if gated else 2) * hidden * inter
    per_patch_block = 3 * hidden * hidden + hidden * hidden + mlp_weights

    full = frame_segment_lengths(grids)
    windowed = window_segment_lengths(vision, grids) if vision.window_size > 0 else full
    full_blocks = set(vision.fullatt_block_indexes) if vision.window_size > 0 else set(range(vision.depth))
    squares_full = sum(n * n for n in full)
    squares_windowed = sum(n * n for n in windowed)
    attention = sum(
        2 * 2 * hidden * (squares_full if block in full_blocks else squares_windowed) for block in range(vision.depth)
    )

    merge_units = patches // (vision.spatial_merge_size**2)
    merged = hidden * vision.spatial_merge_size**2
    return VisionFlops(
        patch_embed=2 * patches * vision.patch_dim * hidden,
        linear=2 * vision.depth * per_patch_block * patches,
        attention=attention,
        merger=2 * merge_units * (merged * merged + merged * vision.out_hidden_size),
    )


def image_grid(height: int, width: int, vision: VisionConfig) -> Grid:
    """The patch grid of one still image whose sides are already multiples of patch_size * merge."""
    unit = vision.patch_size * vision.spatial_merge_size
    if height % unit or width % unit:
        raise ValueError(f"{height}x{width} is not a multiple of {unit} on both sides")
    return (1, height // vision.patch_size, width // vision.patch_size)
