"""Turns a user prompt (text or token ids, plus images and videos) into a validated Request: tokenize, load and
preprocess each image, probe, hash and size each video (its frames are decoded later by the decode stage, chunk by
chunk), expand every `<|image_pad|>` / `<|video_pad|>` to the item's token count (a video's run split into its
chunks' features), and compute M-RoPE positions (over whole videos)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch

from spaceserve.config import EngineConfig
from spaceserve.core.errors import InvalidInputError
from spaceserve.core.multimodal import MultiModalFeature, PlaceholderRange, RawImage
from spaceserve.core.request import Request
from spaceserve.core.sampling_params import SamplingParams
from spaceserve.engine.mm_kwargs import MMProcessorLimits, check_mm_processor_kwargs
from spaceserve.kvcache.encoder_cache import check_fits_encoder_cache
from spaceserve.models.mrope import mrope_positions_for_config
from spaceserve.multimodal.hashing import hash_image
from spaceserve.multimodal.image import ProcessedImage, image_grid, load_image, preprocess_image, smart_resize
from spaceserve.multimodal.video.chunks import video_chunk_features
from spaceserve.multimodal.video.inputs import VIDEO_KWARGS, ResolvedVideo, VideoSettings, resolve_video
from spaceserve.tokenizer.base import Tokenizer
from spaceserve.tokenizer.no_tokenizer import NoTokenizer

PromptType = Union[str, Mapping[str, Any]]
_PROMPT_KEYS = {"prompt", "prompt_token_ids", "multi_modal_data", "mm_processor_kwargs"}
DEFAULT_LIMIT_PER_PROMPT = {"image": 16, "video": 999}
"""Used for a modality limit_mm_per_prompt does not name (999 is vLLM v1's default per modality)."""


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer) -> None:
        self.config = config
        self.model_config = config.model_config
        self.image_config = config.image_config
        self.tokenizer = tokenizer
        self.mm_limits = MMProcessorLimits.from_config(config)

    def process(self, request_id: str, prompt: PromptType, params: SamplingParams) -> Request:
        """Build the request. Videos are only probed here: each leaves a decode job in `request.pending_mm_work`
        (its chunks' features have no pixel values yet) for the engine's decode stage."""
        self._check_params(params)
        text, token_ids, mm_data, processor_kwargs = self._parse(prompt)
        images_in = [self._preprocess(image, processor_kwargs, i) for i, image in enumerate(mm_data["image"])]
        videos_in = [self._resolve_video(video, processor_kwargs, i) for i, video in enumerate(mm_data["video"])]
        token_ids, features, video_starts = self._expand_placeholders(token_ids, images_in, videos_in)
        cache_tokens = self.config.encoder.cache_tokens
        for feature in features:
            check_fits_encoder_cache(feature.num_tokens, cache_tokens)
        for video in videos_in:  # a video's chunks stay cached together until the LM consumes them
            check_fits_encoder_cache(video.plan.num_tokens, cache_tokens, "video")
        max_model_len = self.config.scheduler.max_model_len
        if len(token_ids) >= max_model_len:
            raise InvalidInputError(
                f"prompt is {len(token_ids)} tokens (with images and videos expanded), leaving no room to generate "
                f"within max_model_len={max_model_len}"
            )
        image_grids = [f.grid_thw for f in features if f.modality == "image"]
        video_grids = [video.plan.grid_thw for video in videos_in]
        positions, delta = mrope_positions_for_config(
            token_ids, image_grids, video_grids, self.model_config, [v.second_per_grid_t for v in videos_in]
        )
        request = Request(
            request_id,
            token_ids,
            params,
            eos_token_ids=self.model_config.eos_token_ids,
            mm_features=features,
            mrope_positions=positions,
            mrope_position_delta=delta,
            prompt=text,
        )
        request.pending_mm_work = [(start, video.work) for start, video in zip(video_starts, videos_in)]
        return request

    def _parse(self, prompt: PromptType) -> tuple[str | None, list[int], dict[str, list[Any]], dict[str, Any]]:
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
        mm_data = self._mm_items(prompt.get("multi_modal_data") or {})
        request_kwargs = check_mm_processor_kwargs(
            prompt.get("mm_processor_kwargs"), self.mm_limits, has_images=bool(mm_data["image"]),
            has_videos=bool(mm_data["video"]),
        )
        kwargs = {**self.config.video.processor_kwargs, **request_kwargs}
        unknown_kwargs = set(kwargs) - VIDEO_KWARGS
        if unknown_kwargs:
            raise InvalidInputError(f"unsupported mm_processor_kwargs {sorted(unknown_kwargs)}")
        return text, token_ids, mm_data, kwargs

    def _check_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: it knows no vocabulary, and n > 1 is fanned out in front of the
        engine (LLM.generate, the server), which runs one sequence per request."""
        if not isinstance(params, SamplingParams):
            raise InvalidInputError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if params.n != 1:
            raise InvalidInputError(f"the engine runs one sequence per request (n=1); n={params.n} is fanned out by "
                                    "LLM.generate and the server")
        if params.stop and isinstance(self.tokenizer, NoTokenizer):
            raise InvalidInputError("stop strings need a tokenizer (the engine runs with skip_tokenizer_init); use "
                                    "stop_token_ids")
        vocab = self.model_config.text.vocab_size
        outside = [t for t in params.stop_token_ids if t >= vocab]
        if outside:
            raise InvalidInputError(f"stop_token_ids holds {outside[0]}, not a token id in [0, {vocab})")

    def _check_token_ids(self, token_ids: Any) -> list[int]:
        if not isinstance(token_ids, Sequence) or isinstance(token_ids, str):
            raise InvalidInputError("'prompt_token_ids' must be a list of ints")
        vocab = self.model_config.text.vocab_size
        ids = list(token_ids)
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise InvalidInputError(f"prompt_token_ids holds {bad[0]!r}, not a token id in [0, {vocab})")
        return ids

    def _mm_items(self, mm_data: Mapping[str, Any]) -> dict[str, list[Any]]:
        if not isinstance(mm_data, Mapping):
            raise InvalidInputError("'multi_modal_data' must be a dict like {'image': [...], 'video': [...]}")
        unsupported = set(mm_data) - {"image", "video"}
        if unsupported:
            raise InvalidInputError(
                f"unsupported modalities {sorted(unsupported)}; this engine takes 'image' and 'video'"
            )
        items = {}
        for modality in ("image", "video"):
            value = mm_data.get(modality, [])
            # one video may itself be a list of frames: a list of videos is a list whose items are not frames
            if modality == "video" and isinstance(value, list) and value and not _is_video_list(value):
                value = [value]
            values = value if isinstance(value, list) else [value]
            limit = self.config.limit_mm_per_prompt.get(modality, DEFAULT_LIMIT_PER_PROMPT[modality])
            if len(values) > limit:
                raise InvalidInputError(
                    f"{len(values)} {modality}s in one prompt exceed limit_mm_per_prompt {modality}={limit}"
                )
            items[modality] = values
        return items

    def _resolve_video(self, video: Any, kwargs: dict[str, Any], index: int) -> ResolvedVideo:
        try:
            settings = VideoSettings.from_kwargs(kwargs, self.image_config.temporal_patch_size)
            return resolve_video(video, settings, self.image_config, self.config.video)
        except InvalidInputError as exc:
            raise InvalidInputError(f"video {index}: {exc}") from None

    def _preprocess(self, image: Any, kwargs: dict[str, Any], index: int) -> tuple[str, ProcessedImage]:
        """Decode, hash and size the image; resize + normalise + patchify it here, or leave that to the engine core
        on its device (large images with a GPU: `core_preprocess_min_pixels`), sending the uint8 pixels."""
        limits = {key: kwargs.get(key, getattr(self.image_config, key)) for key in ("min_pixels", "max_pixels")}
        try:
            rgb = load_image(image)
            threshold = self.config.core_preprocess_min_pixels
            if threshold is not None and rgb.width * rgb.height >= threshold:
                processed = self._raw_for_core(rgb, **limits)
            else:
                processed = preprocess_image(rgb, self.image_config, **limits)
        except InvalidInputError as exc:
            raise InvalidInputError(f"image {index}: {exc}") from None
        return hash_image(rgb, **limits), processed

    def _raw_for_core(self, rgb: Any, min_pixels: int, max_pixels: int) -> ProcessedImage:
        if not 0 < min_pixels <= max_pixels:
            raise InvalidInputError(
                f"need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels}, max_pixels={max_pixels}"
            )
        cfg = self.image_config
        height, width = smart_resize(rgb.height, rgb.width, cfg.factor, min_pixels, max_pixels)
        raw = RawImage(np.asarray(rgb), height, width)
        return ProcessedImage(pixel_values=raw, grid_thw=image_grid(height, width, cfg), merge_size=cfg.merge_size)

    def _expand_placeholders(
        self, token_ids: list[int], images: list[tuple[str, Any]], videos: list[ResolvedVideo]
    ) -> tuple[list[int], list[MultiModalFeature], list[int]]:
        """Expand each `<|image_pad|>` / `<|video_pad|>` to its item's tokens, in prompt order. Returns the ids,
        the features (a video as its chunks) and the index of each video's first chunk among the features."""
        pad_tokens = {"image": self.model_config.image_token_id, "video": self.model_config.video_token_id}
        for modality, items in (("image", images), ("video", videos)):
            num_placeholders = token_ids.count(pad_tokens[modality])
            if num_placeholders != len(items):
                raise InvalidInputError(
                    f"the prompt has {num_placeholders} <|{modality}_pad|> placeholders but {len(items)} {modality}s "
                    f"were given; put one <|{modality}_pad|> per {modality} (the chat template does this)"
                )
        expanded: list[int] = []
        features: list[MultiModalFeature] = []
        video_starts: list[int] = []
        image_iter, video_iter = iter(images), iter(videos)
        for token in token_ids:
            if token == pad_tokens["image"]:
                mm_hash, processed = next(image_iter)
                feature = MultiModalFeature(
                    mm_hash=mm_hash,
                    modality="image",
                    placeholder=PlaceholderRange(len(expanded), processed.num_tokens),
                    num_patches=processed.num_patches,
                    grid_thw=processed.grid_thw,
                    pixel_values=processed.pixel_values,
                )
                expanded.extend([token] * feature.num_tokens)
                features.append(feature)
            elif token == pad_tokens["video"]:
                work = next(video_iter).work
                video_starts.append(len(features))
                features += video_chunk_features(
                    work.mm_hash, len(expanded), work.plan.grid_thw, work.plan.merge_size, work.chunks
                )
                expanded.extend([token] * work.plan.num_tokens)
            else:
                expanded.append(token)
        return expanded, features, video_starts


def check_max_tokens_fit(request: Request, max_model_len: int) -> None:
    """The server's rule (vLLM's): a prompt plus max_tokens past the context is refused, not cut short. Offline
    callers keep the engine's behaviour: generation stops at max_model_len."""
    max_tokens = request.sampling_params.max_tokens
    num_prompt = request.num_prompt_tokens
    if max_tokens is not None and num_prompt + max_tokens > max_model_len:
        raise InvalidInputError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} in the completion); reduce "
            "the prompt or max_tokens"
        )


def _is_video_list(value: list[Any]) -> bool:
    """Whether a 'video' list holds several videos (paths, bytes, TxHxWx3 arrays, frame lists) rather than the
    frames of one video (PIL images or HxWx3 arrays)."""
    first = value[0]
    if isinstance(first, (str, os.PathLike, bytes, bytearray, memoryview, list, tuple)):
        return True
    return isinstance(first, (np.ndarray, torch.Tensor)) and first.ndim == 4
