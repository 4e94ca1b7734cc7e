"""The OpenAI wire format: request bodies as pydantic models, responses and stream chunks, the error body.

Field names and defaults follow OpenAI's API; the extensions vLLM users expect (top_k, min_tokens, ignore_eos,
stop_token_ids, ...) sit beside them. Fields OpenAI defines but spaceserve does not implement are accepted only at
their neutral value, so a client asking for them gets a 400 naming the field instead of a silent no-op.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from spaceserve.core.errors import InvalidInputError
from spaceserve.core.sampling_params import SamplingParams


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


# ---- errors -------------------------------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class OpenAIServingError(Exception):
    """An error to answer with OpenAI's error body and an HTTP status."""

    def __init__(
        self, message: str, *, status_code: int = 400, type: str = "BadRequestError", param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))


# ---- requests -----------------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


MAX_N = 128
"""Most samples one request may ask for (n); each is a request of its own inside the engine."""
STRUCTURED_OUTPUT_UNSUPPORTED = (
    "structured output (response_format {type}) is not supported by this server yet; send response_format "
    "{{'type': 'text'}} or leave it out"
)

# (field, the value meaning "not used"): a request setting anything else gets a 400 naming the field
_UNSUPPORTED = {
    "tools": (None, []),
    "functions": (None, []),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    # vLLM's extensions that change what is sampled or returned: refused, never silently ignored
    "min_p": (None, 0, 0.0),
    "prompt_logprobs": (None,),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "logits_processors": (None, []),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1, 1.0),
    "truncate_prompt_tokens": (None,),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "structured_outputs": (None,),
    "priority": (None, 0),
}


class _SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # extensions, named as vLLM names them
    top_k: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def check_supported(self) -> None:
        extras = self.model_extra or {}
        for name, neutral in _UNSUPPORTED.items():
            if name in extras and extras[name] not in neutral:
                raise OpenAIServingError(f"'{name}' is not supported by this server", param=name)
        if self.stream_options is not None and not self.stream:
            raise OpenAIServingError("stream_options is only allowed when stream is true", param="stream_options")

        if not 1 <= self.n <= MAX_N:
            raise OpenAIServingError(f"n must be in [1, {MAX_N}], got {self.n}", param="n")

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def _logprobs(self) -> int | None:
        return None

    def to_sampling_params(self, default_max_tokens: int | None) -> SamplingParams:
        max_tokens = self._max_tokens()
        try:
            return SamplingParams(
                n=self.n,
                logprobs=self._logprobs(),
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=-1 if self.top_k is None else self.top_k,
                seed=self.seed,
                max_tokens=default_max_tokens if max_tokens is None else max_tokens,
                min_tokens=self.min_tokens,
                stop=tuple([self.stop] if isinstance(self.stop, str) else self.stop or ()),
                stop_token_ids=tuple(self.stop_token_ids or ()),
                ignore_eos=self.ignore_eos,
                skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
            )
        except InvalidInputError as exc:
            param = str(exc).split(" ", 1)[0]
            if param == "logprobs" and isinstance(self, ChatCompletionRequest):
                param = "top_logprobs"
            raise OpenAIServingError(str(exc), param=param) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tool_choice: Literal["none"] | None = None
    response_format: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    """vLLM's extension: this request's image/video processing settings (min/max_pixels, fps, num_frames, ...),
    capped by the server's own limits."""
    logprobs: bool = False
    top_logprobs: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.response_format not in (None, {"type": "text"}):
            kind = self.response_format.get("type") if isinstance(self.response_format, dict) else None
            raise OpenAIServingError(STRUCTURED_OUTPUT_UNSUPPORTED.format(type=kind), param="response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIServingError("top_logprobs needs logprobs set to true", param="top_logprobs")

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None

    def _logprobs(self) -> int | None:
        return self.logprobs


# ---- responses ----------------------------------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, num_prompt_tokens: int, num_completion_tokens: int) -> UsageInfo:
        return cls(
            prompt_tokens=num_prompt_tokens,
            completion_tokens=num_completion_tokens,
            total_tokens=num_prompt_tokens + num_completion_tokens,
        )


class ChatMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatCompletionLogprobs(BaseModel):
    content: list[ChatCompletionLogprob] | None = None


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: ChatCompletionLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now_s)
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    """Only the fields a chunk carries appear on the wire (OpenAI sends {"content": "..."} or {})."""

    role: str | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatCompletionStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: ChatCompletionLogprobs | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now_s)
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists per token."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now_s)
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now_s)
    owned_by: str = "spaceserve"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
