"""The offline API in the shape vLLM users know: LLM(model, ...).generate(prompts, sampling_params)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from spaceserve.config import CacheConfig, EncoderConfig, EngineConfig, SchedulerConfig
from spaceserve.core.errors import ConfigError, InvalidInputError
from spaceserve.core.outputs import RequestOutput
from spaceserve.core.sampling_params import SamplingParams
from spaceserve.engine.chat import parse_chat_messages
from spaceserve.engine.input_processor import PromptType
from spaceserve.engine.llm_engine import LLMEngine
from spaceserve.models.resolve import TINY_PRESETS, resolve_model


class LLM:
    def __init__(
        self,
        model: str,
        *,
        load_format: str = "auto",
        dtype: str = "auto",
        device: str | None = None,
        seed: int = 0,
        max_model_len: int | None = None,
        max_num_batched_tokens: int = 8192,
        max_num_seqs: int = 256,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        num_gpu_blocks_override: int | None = None,
        gpu_memory_utilization: float = 0.9,
        kv_cache_memory_bytes: int | None = None,
        limit_mm_per_prompt: dict[str, int] | None = None,
        encoder_policy: str = "fcfs",
        encoder_window_s: float = 0.05,
        encoder_budget_tokens: int | None = None,
        encoder_cache_tokens: int | None = None,
        multiplex: str = "time",
    ) -> None:
        resolved = resolve_model(model)
        if load_format == "auto" and not resolved.has_weights:
            if resolved.name.split("/")[-1] not in TINY_PRESETS:
                raise ConfigError(
                    f"{model!r} has no weights here (no downloads); pass load_format='dummy' for random weights"
                )
            load_format = "dummy"  # the tiny presets exist to run without weights
        if multiplex != "time":
            raise ConfigError(f"multiplex mode {multiplex!r} is not available yet; this build runs 'time'")
        max_model_len = max_model_len or resolved.model_config.text.max_position_embeddings
        image = resolved.image_config
        largest_image_tokens = image.max_pixels // (image.factor**2)
        config = EngineConfig(
            model=model,
            model_config=resolved.model_config,
            image_config=image,
            model_dir=str(resolved.directory),
            load_format=load_format,  # type: ignore[arg-type]
            dtype=dtype,
            device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
            seed=seed,
            multiplex=multiplex,  # type: ignore[arg-type]
            limit_mm_per_prompt=dict(limit_mm_per_prompt or {"image": 16}),
            cache=CacheConfig(
                block_size=block_size,
                enable_prefix_caching=enable_prefix_caching,
                num_gpu_blocks=num_gpu_blocks_override,
                gpu_memory_utilization=gpu_memory_utilization,
                kv_cache_memory_bytes=kv_cache_memory_bytes,
            ),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs, max_model_len=max_model_len
            ),
            encoder=EncoderConfig(
                policy=encoder_policy,  # type: ignore[arg-type]
                window_s=encoder_window_s,
                budget_tokens=encoder_budget_tokens or max_num_batched_tokens,
                cache_tokens=encoder_cache_tokens or max(max_num_batched_tokens, largest_image_tokens),
            ),
        )
        self.llm_engine = LLMEngine(config)

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion; one output per prompt, in order. A bad prompt raises InvalidInputError naming
        it, and none of the batch is queued."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params = _per_prompt(sampling_params, len(prompts))
        engine = self.llm_engine
        requests = []
        try:
            for index, (prompt, param) in enumerate(zip(prompts, params)):
                try:
                    requests.append(engine.add_request(prompt, param))
                except InvalidInputError as exc:
                    raise InvalidInputError(f"prompt {index}: {exc}") from None
        except InvalidInputError:
            engine.abort_request([r.request_id for r in requests])
            raise
        final: dict[str, RequestOutput] = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    final[output.request_id] = output
        return [final[r.request_id] for r in requests]

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """OpenAI-style messages (text, image_url and image parts) through the model's chat template."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = []
        for conversation in conversations:
            template_messages, images = parse_chat_messages(conversation)
            text = self.get_tokenizer().apply_chat_template(template_messages, add_generation_prompt)
            prompt: dict[str, Any] = {"prompt": text}
            if images:
                prompt["multi_modal_data"] = {"image": images}
            prompts.append(prompt)
        return self.generate(prompts, sampling_params)


def _per_prompt(params: SamplingParams | Sequence[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise InvalidInputError(f"{len(params)} sampling params for {count} prompts")
    return params
