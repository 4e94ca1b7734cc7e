"""Find a model's files: a local Hugging Face directory, the local Hub cache, or a built-in preset (config only)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from spaceserve.core.errors import ConfigError
from spaceserve.models.config import ImageProcessorConfig, ModelConfig

PRESETS_DIR = Path(__file__).parent / "presets"
TINY_PRESETS = ("tiny-qwen2-vl", "tiny-qwen2.5-vl")


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    directory: Path
    model_config: ModelConfig
    image_config: ImageProcessorConfig
    is_preset: bool

    @property
    def has_weights(self) -> bool:
        return any(self.directory.glob("*.safetensors"))


def preset_names() -> list[str]:
    return sorted(p.name for p in PRESETS_DIR.iterdir() if (p / "config.json").is_file())


def resolve_model(name: str) -> ResolvedModel:
    directory, is_preset = _find_directory(name)
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {directory / 'config.json'}: {exc}") from None
    processor_file = directory / "preprocessor_config.json"
    image_config = (
        ImageProcessorConfig.from_hf_dict(json.loads(processor_file.read_text()))
        if processor_file.is_file()
        else ImageProcessorConfig()
    )
    return ResolvedModel(name, directory, ModelConfig.from_hf_dict(raw), image_config, is_preset)


def _find_directory(name: str) -> tuple[Path, bool]:
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} has no config.json")
        return path, False
    cached = _hub_cache_snapshot(name)
    if cached is not None:
        return cached, False
    preset = PRESETS_DIR / name.split("/")[-1]
    if (preset / "config.json").is_file():
        return preset, True
    raise ConfigError(
        f"model {name!r} is neither a local directory, a model in the Hugging Face cache, nor a preset "
        f"({', '.join(preset_names())})"
    )


def _hub_cache_snapshot(name: str) -> Path | None:
    if name.count("/") != 1:
        return None
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    snapshots = hub.expanduser() / f"models--{name.replace('/', '--')}" / "snapshots"
    if not snapshots.is_dir():
        return None
    candidates = sorted((p for p in snapshots.iterdir() if (p / "config.json").is_file()), key=os.path.getmtime)
    return candidates[-1] if candidates else None
