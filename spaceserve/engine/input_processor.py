"""Turns a user prompt (text or token ids, plus images) into a validated Request: tokenize, load and preprocess
each image, expand every `<|image_pad|>` to the image's token count, and compute M-RoPE positions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

from spaceserve.config import EngineConfig
from spaceserve.core.errors import InvalidInputError
from spaceserve.core.multimodal import MultiModalFeature, PlaceholderRange
from spaceserve.core.request import Request
from spaceserve.core.sampling_params import SamplingParams
from spaceserve.models.mrope import mrope_positions_for_config
from spaceserve.multimodal.hashing import hash_image
from spaceserve.multimodal.image import load_image, preprocess_image
from spaceserve.tokenizer.base import Tokenizer

PromptType = Union[str, Mapping[str, Any]]
_PROMPT_KEYS = {"prompt", "prompt_token_ids", "multi_modal_data", "mm_processor_kwargs"}


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer) -> None:
        self.config = config
        self.model_config = config.model_config
        self.image_config = config.image_config
        self.tokenizer = tokenizer

    def process(self, request_id: str, prompt: PromptType, params: SamplingParams) -> Request:
        text, token_ids, images, processor_kwargs = self._parse(prompt)
        features_in = [self._preprocess(image, processor_kwargs, i) for i, image in enumerate(images)]
        token_ids, features = self._expand_placeholders(token_ids, features_in)
        if len(token_ids) >= self.config.scheduler.max_model_len:
            raise InvalidInputError(
                f"prompt is {len(token_ids)} tokens (with images expanded), leaving no room to generate within "
                f"max_model_len={self.config.scheduler.max_model_len}"
            )
        positions, delta = mrope_positions_for_config(token_ids, [f.grid_thw for f in features], [], self.model_config)
        return Request(
            request_id,
            token_ids,
            params,
            eos_token_ids=self.model_config.eos_token_ids,
            mm_features=features,
            mrope_positions=positions,
            mrope_position_delta=delta,
            prompt=text,
        )

    def _parse(self, prompt: PromptType) -> tuple[str | None, list[int], list[Any], dict[str, Any]]:
        if isinstance(prompt, str):
            prompt = {"prompt": prompt}
        if not isinstance(prompt, Mapping):
            raise InvalidInputError(f"a prompt is a string or a dict, got {type(prompt).__name__}")
        unknown = set(prompt) - _PROMPT_KEYS
        if unknown:
            raise InvalidInputError(f"unknown prompt keys {sorted(unknown)}; expected some of {sorted(_PROMPT_KEYS)}")
        if ("prompt" in prompt) == ("prompt_token_ids" in prompt):
            raise InvalidInputError("a prompt dict needs exactly one of 'prompt' or 'prompt_token_ids'")
        text = prompt.get("prompt")
        if text is not None:
            if not isinstance(text, str):
                raise InvalidInputError(f"'prompt' must be a string, got {type(text).__name__}")
            token_ids = self.tokenizer.encode(text)
        else:
            token_ids = self._check_token_ids(prompt["prompt_token_ids"])
        if not token_ids:
            raise InvalidInputError("the prompt is empty")
        images = self._images(prompt.get("multi_modal_data") or {})
        kwargs = dict(prompt.get("mm_processor_kwargs") or {})
        unknown_kwargs = set(kwargs) - {"min_pixels", "max_pixels"}
        if unknown_kwargs:
            raise InvalidInputError(f"unsupported mm_processor_kwargs {sorted(unknown_kwargs)}")
        return text, token_ids, images, kwargs

    def _check_token_ids(self, token_ids: Any) -> list[int]:
        if not isinstance(token_ids, Sequence) or isinstance(token_ids, str):
            raise InvalidInputError("'prompt_token_ids' must be a list of ints")
        vocab = self.model_config.text.vocab_size
        ids = list(token_ids)
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise InvalidInputError(f"prompt_token_ids holds {bad[0]!r}, not a token id in [0, {vocab})")
        return ids

    def _images(self, mm_data: Mapping[str, Any]) -> list[Any]:
        if not isinstance(mm_data, Mapping):
            raise InvalidInputError("'multi_modal_data' must be a dict like {'image': image_or_list}")
        unsupported = set(mm_data) - {"image"}
        if unsupported:
            raise InvalidInputError(f"unsupported modalities {sorted(unsupported)}; this engine takes 'image'")
        images = mm_data.get("image", [])
        if not isinstance(images, list):
            images = [images]
        limit = self.config.limit_mm_per_prompt.get("image", 0)
        if len(images) > limit:
            raise InvalidInputError(f"{len(images)} images in one prompt exceed limit_mm_per_prompt image={limit}")
        return images

    def _preprocess(self, image: Any, kwargs: dict[str, Any], index: int) -> tuple[str, Any]:
        limits = {key: kwargs.get(key, getattr(self.image_config, key)) for key in ("min_pixels", "max_pixels")}
        try:
            rgb = load_image(image)
            processed = preprocess_image(rgb, self.image_config, **limits)
        except InvalidInputError as exc:
            raise InvalidInputError(f"image {index}: {exc}") from None
        return hash_image(rgb, **limits), processed

    def _expand_placeholders(
        self, token_ids: list[int], images: list[tuple[str, Any]]
    ) -> tuple[list[int], list[MultiModalFeature]]:
        image_token = self.model_config.image_token_id
        num_placeholders = token_ids.count(image_token)
        if num_placeholders != len(images):
            raise InvalidInputError(
                f"the prompt has {num_placeholders} <|image_pad|> placeholders but {len(images)} images were given; "
                "put one <|image_pad|> per image (the chat template does this)"
            )
        expanded: list[int] = []
        features: list[MultiModalFeature] = []
        image_iter = iter(images)
        for token in token_ids:
            if token != image_token:
                expanded.append(token)
                continue
            mm_hash, processed = next(image_iter)
            placeholder = PlaceholderRange(len(expanded), processed.num_tokens)
            expanded.extend([image_token] * processed.num_tokens)
            features.append(
                MultiModalFeature(
                    mm_hash=mm_hash,
                    modality="image",
                    placeholder=placeholder,
                    num_patches=processed.num_patches,
                    grid_thw=processed.grid_thw,
                    pixel_values=processed.pixel_values,
                )
            )
        return expanded, features

