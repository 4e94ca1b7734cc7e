"""Typed views of a Hugging Face Qwen2-VL / Qwen2.5-VL config.json and preprocessor_config.json.

Published checkpoints come in two layouts: Qwen2-VL-2B keeps the language-model fields at the top level,
newer saves nest them under ``text_config``. Both parse to the same frozen dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spaceserve.core.errors import ConfigError

QWEN2_VL = "Qwen2VLForConditionalGeneration"
QWEN2_5_VL = "Qwen2_5_VLForConditionalGeneration"


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    hidden_act: str = "quick_gelu"
    window_size: int = 0
    fullatt_block_indexes: tuple[int, ...] = ()
    tokens_per_second: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    max_position_embeddings: int
    tie_word_embeddings: bool
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    torch_dtype: str

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        architectures = raw.get("architectures") or []
        if not architectures:
            raise ConfigError("config.json has no 'architectures' entry")
        architecture = architectures[0]
        if architecture not in (QWEN2_VL, QWEN2_5_VL):
            raise ConfigError(f"unsupported architecture {architecture!r}; spaceserve serves {QWEN2_VL} and {QWEN2_5_VL}")
        text_raw = dict(raw)
        text_raw.update(raw.get("text_config") or {})
        text = _parse_text(text_raw)
        vision = _parse_vision(raw.get("vision_config") or {}, architecture, text.hidden_size)

        def token_id(name: str) -> int:
            value = raw.get(name, text_raw.get(name))
            if value is None:
                raise ConfigError(f"config.json lacks {name}")
            return int(value)

        eos = text_raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=architecture,
            text=text,
            vision=vision,
            image_token_id=token_id("image_token_id"),
            video_token_id=token_id("video_token_id"),
            vision_start_token_id=token_id("vision_start_token_id"),
            vision_end_token_id=token_id("vision_end_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            bos_token_id=text_raw.get("bos_token_id"),
            torch_dtype=str(text_raw.get("torch_dtype") or text_raw.get("dtype") or "bfloat16"),
        )


def _parse_text(raw: dict[str, Any]) -> TextConfig:
    rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    section = rope.get("mrope_section")
    if section is None:
        raise ConfigError("config.json lacks rope_scaling.mrope_section (M-RoPE)")
    try:
        text = TextConfig(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=int(raw["num_attention_heads"]),
            num_key_value_heads=int(raw.get("num_key_value_heads", raw["num_attention_heads"])),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(raw.get("rope_theta", rope.get("rope_theta", 1_000_000.0))),
            mrope_section=tuple(int(s) for s in section),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            hidden_act=str(raw.get("hidden_act", "silu")),
        )
    except KeyError as exc:
        raise ConfigError(f"config.json lacks the language-model field {exc.args[0]!r}") from None
    if 2 * sum(text.mrope_section) != text.head_dim:
        raise ConfigError(f"mrope_section {text.mrope_section} does not cover head_dim {text.head_dim}")
    return text


def _parse_vision(raw: dict[str, Any], architecture: str, text_hidden: int) -> VisionConfig:
    # A transformers re-save drops vision keys equal to the class defaults; these are those defaults.
    if architecture == QWEN2_VL:
        hidden = int(raw.get("embed_dim", 1280))
        return VisionConfig(
            depth=int(raw.get("depth", 32)),
            hidden_size=hidden,
            num_heads=int(raw.get("num_heads", 16)),
            intermediate_size=int(hidden * raw.get("mlp_ratio", 4)),
            out_hidden_size=int(raw.get("hidden_size", text_hidden)),
            patch_size=int(raw.get("patch_size", 14)),
            temporal_patch_size=int(raw.get("temporal_patch_size", 2)),
            spatial_merge_size=int(raw.get("spatial_merge_size", 2)),
            in_channels=int(raw.get("in_chans", raw.get("in_channels", 3))),
            hidden_act=str(raw.get("hidden_act", "quick_gelu")),
        )
    return VisionConfig(
        depth=int(raw.get("depth", 32)),
        hidden_size=int(raw.get("hidden_size", 1280)),
        num_heads=int(raw.get("num_heads", 16)),
        intermediate_size=int(raw.get("intermediate_size", 3420)),
        out_hidden_size=int(raw.get("out_hidden_size", text_hidden)),
        patch_size=int(raw.get("patch_size", 14)),
        temporal_patch_size=int(raw.get("temporal_patch_size", 2)),
        spatial_merge_size=int(raw.get("spatial_merge_size", 2)),
        in_channels=int(raw.get("in_chans", raw.get("in_channels", 3))),
        hidden_act=str(raw.get("hidden_act", "silu")),
        window_size=int(raw.get("window_size", 112)),
        fullatt_block_indexes=tuple(int(i) for i in raw.get("fullatt_block_indexes", (7, 15, 23, 31))),
        tokens_per_second=int(raw.get("tokens_per_second", 2)),
    )


@dataclass(frozen=True)
class ImageProcessorConfig:
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "ImageProcessorConfig":
        size = raw.get("size") or {}
        defaults = cls()
        return cls(
            min_pixels=int(raw.get("min_pixels") or size.get("shortest_edge") or defaults.min_pixels),
            max_pixels=int(raw.get("max_pixels") or size.get("longest_edge") or defaults.max_pixels),
            patch_size=int(raw.get("patch_size", defaults.patch_size)),
            temporal_patch_size=int(raw.get("temporal_patch_size", defaults.temporal_patch_size)),
            merge_size=int(raw.get("merge_size", defaults.merge_size)),
            image_mean=tuple(raw.get("image_mean", defaults.image_mean)),
            image_std=tuple(raw.get("image_std", defaults.image_std)),
        )
