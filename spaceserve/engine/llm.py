"""The offline API in the shape vLLM users know: LLM(model, ...).generate(prompts, sampling_params)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from spaceserve.core.errors import InvalidInputError
from spaceserve.core.outputs import RequestOutput
from spaceserve.core.sampling_params import SamplingParams
from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.engine.chat import parse_chat_messages
from spaceserve.engine.chat_video import load_offline_video
from spaceserve.engine.input_processor import PromptType
from spaceserve.engine.llm_engine import LLMEngine


class LLM:
    def __init__(self, model: str, **kwargs: Any) -> None:
        """Takes EngineArgs' fields as keywords (load_format, dtype, max_model_len, ...), as vLLM's LLM does."""
        engine_args = EngineArgs(model=model, **kwargs)
        self.llm_engine = LLMEngine(engine_args.create_engine_config(), multiprocess=engine_args.multiprocess)

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
        """OpenAI-style messages (text, image_url, image, video_url and video parts) through the model's chat
        template."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = []
        for conversation in conversations:
            video_sources: list[Any] = []
            template_messages, images = parse_chat_messages(conversation, videos=video_sources)
            videos = [load_offline_video(source) for source in video_sources]
            text = self.get_tokenizer().apply_chat_template(template_messages, add_generation_prompt)
            prompt: dict[str, Any] = {"prompt": text}
            mm_data = {"image": images} if images else {}
            if videos:
                mm_data["video"] = videos
            if mm_data:
                prompt["multi_modal_data"] = mm_data
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
