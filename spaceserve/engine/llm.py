"""The offline API in the shape vLLM users know: LLM(model, ...).generate(prompts, sampling_params)."""

from __future__ import annotations

import contextlib
import itertools
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
from spaceserve.tokenizer.chat_template import check_template_kwargs
from spaceserve.engine.parallel_sampling import child_params, child_request_id, merge_outputs


class LLM:
    def __init__(self, model: str, **kwargs: Any) -> None:
        """Takes EngineArgs' fields as keywords (load_format, dtype, max_model_len, ...), as vLLM's LLM does."""
        engine_args = EngineArgs(model=model, **kwargs)
        self.llm_engine = LLMEngine(engine_args.create_engine_config(), multiprocess=engine_args.multiprocess)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run prompts to completion; one output per prompt, in order (with n completions when params.n > 1). A bad
        prompt raises InvalidInputError naming it, and none of the batch is queued. `use_tqdm` shows a progress
        bar over the requests (as vLLM's; only when there are several)."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params = _per_prompt(sampling_params, len(prompts))
        engine = self.llm_engine
        families: list[tuple[str, list[str]]] = []  # (parent id, child ids): n > 1 fans out to n requests
        added: list[str] = []
        try:
            for index, (prompt, param) in enumerate(zip(prompts, params)):
                parent_id = f"llm-{next(self._ids)}"
                children = []
                for child_index, child in enumerate(child_params(param)):
                    child_id = parent_id if param.n == 1 else child_request_id(parent_id, child_index)
                    try:
                        engine.add_request(prompt, child, child_id)
                    except InvalidInputError as exc:
                        raise InvalidInputError(f"prompt {index}: {exc}") from None
                    added.append(child_id)
                    children.append(child_id)
                families.append((parent_id, children))
        except InvalidInputError:
            engine.abort_request(added)
            raise
        final: dict[str, RequestOutput] = {}
        with _progress(use_tqdm, len(added)) as progress:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        final[output.request_id] = output
                        progress.update(1)
        return [merge_outputs(parent, [final[child] for child in children]) for parent, children in families]

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """OpenAI-style messages (text, image_url, image, video_url and video parts) through the model's chat
        template."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = []
        for conversation in conversations:
            video_sources: list[Any] = []
            template_messages, images = parse_chat_messages(conversation, videos=video_sources)
            videos = [load_offline_video(source) for source in video_sources]
            text = self.get_tokenizer().apply_chat_template(
                template_messages, add_generation_prompt, **check_template_kwargs(chat_template_kwargs)
            )
            prompt: dict[str, Any] = {"prompt": text}
            mm_data = {"image": images} if images else {}
            if videos:
                mm_data["video"] = videos
            if mm_data:
                prompt["multi_modal_data"] = mm_data
            prompts.append(prompt)
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)


def _progress(use_tqdm: bool, total: int):
    if not use_tqdm or total < 2:
        return contextlib.nullcontext(_NoProgress())
    from tqdm import tqdm

    return tqdm(total=total, desc="Processed prompts", unit="req", dynamic_ncols=True)


class _NoProgress:
    def update(self, count: int) -> None:
        pass


def _per_prompt(params: SamplingParams | Sequence[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise InvalidInputError(f"{len(params)} sampling params for {count} prompts")
    return params
