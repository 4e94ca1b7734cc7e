"""Where benchmark requests go: an in-process AsyncLLM, or an OpenAI-compatible server over streaming HTTP.

Both time every request on the client the same way, so the same workload can be measured with and without HTTP.
`prepare` does all per-request encoding (chat template, data URLs, JSON) before the clock starts; `send` only sends,
times, and turns any failure into a failed RequestRecord rather than an exception.
"""

from __future__ import annotations

import base64
import inspect
import json
import time
from typing import Any, Protocol

from spaceserve.bench.metrics import RequestRecord, ttft_split
from spaceserve.bench.workloads import RequestSpec
from spaceserve.core.sampling_params import SamplingParams
from spaceserve.tokenizer.base import Tokenizer

_MAX_ERROR_CHARS = 300


class Backend(Protocol):
    name: str

    def prepare(self, spec: RequestSpec) -> Any:
        """Everything `send` needs, built ahead of the timed run."""
        ...

    async def send(self, prepared: Any, request_id: str, arrival_time: float) -> RequestRecord: ...

    async def engine_counters(self) -> dict[str, int] | None:
        """Cumulative engine counters (preemptions, prefix-cache tokens) where the backend can see them."""
        ...

    async def close(self) -> None: ...


def chat_messages(spec: RequestSpec, media_parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One user turn: the media first, then the text, as the Qwen-VL chat examples put them."""
    return [{"role": "user", "content": [*media_parts, {"type": "text", "text": spec.prompt_text}]}]


def greedy_fixed_length(output_len: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)


def _failure(
    spec: RequestSpec, arrival_time: float, send_time: float, error: str, token_times: list[float] | None = None
) -> RequestRecord:
    return RequestRecord(
        index=spec.index,
        success=False,
        arrival_time=arrival_time,
        send_time=send_time,
        end_time=time.perf_counter(),
        token_times=tuple(token_times or ()),
        expected_output_tokens=spec.output_len,
        error=error[:_MAX_ERROR_CHARS],
    )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class InProcessBackend:
    """Requests go straight into an AsyncLLM in this process (no HTTP, no serialisation)."""

    name = "inprocess"

    def __init__(self, engine: Any, tokenizer: Tokenizer) -> None:
        self.engine = engine  # spaceserve.engine.async_llm.AsyncLLM
        self.tokenizer = tokenizer

    def prepare(self, spec: RequestSpec) -> tuple[RequestSpec, dict[str, Any]]:
        messages = chat_messages(spec, [{"type": item.modality} for item in spec.media])
        prompt: dict[str, Any] = {"prompt": self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)}
        if spec.media:
            media: dict[str, list[bytes]] = {}
            for item in spec.media:
                media.setdefault(item.modality, []).append(item.data)
            prompt["multi_modal_data"] = media
        return spec, prompt

    async def send(
        self, prepared: tuple[RequestSpec, dict[str, Any]], request_id: str, arrival_time: float
    ) -> RequestRecord:
        spec, prompt = prepared
        send_time = time.perf_counter()
        token_times: list[float] = []
        num_tokens = 0
        final = None
        try:
            async for output in self.engine.generate(prompt, greedy_fixed_length(spec.output_len), request_id):
                now = time.perf_counter()
                count = len(output.outputs[0].token_ids)
                if count > num_tokens:
                    token_times.append(now)
                    num_tokens = count
                final = output
        except Exception as exc:  # any failure is a failed request of the run, never a crashed benchmark
            return _failure(spec, arrival_time, send_time, _describe(exc), token_times)
        if final is None or not final.finished:
            return _failure(spec, arrival_time, send_time, "the output stream ended before the request finished")
        completion = final.outputs[0]
        if final.error is not None or completion.finish_reason in ("abort", "error"):
            return _failure(spec, arrival_time, send_time, final.error or f"finish_reason={completion.finish_reason}")
        if not token_times:
            return _failure(spec, arrival_time, send_time, "finished without producing a token")
        return RequestRecord(
            index=spec.index,
            success=True,
            arrival_time=arrival_time,
            send_time=send_time,
            end_time=token_times[-1],  # the final output carries the last token
            token_times=tuple(token_times),
            output_tokens=len(completion.token_ids),
            expected_output_tokens=spec.output_len,
            prompt_tokens=len(final.prompt_token_ids),
            encoder_queue_delay=_encoder_queue_delay(final.metrics),
            **ttft_split(final.metrics),
        )

    async def engine_counters(self) -> dict[str, float]:
        # preemptions, prefix-cache tokens and the loop counters (host time of the LM loop and the encoder worker),
        # read between steps in the engine core: exact
        return await self.engine.call_utility("engine_counters")

    async def close(self) -> None:
        result = self.engine.shutdown()
        if inspect.isawaitable(result):
            await result


def _encoder_queue_delay(metrics: dict[str, float]) -> float | None:
    enqueued, scheduled = metrics.get("encoder_enqueued_time"), metrics.get("encoder_scheduled_time")
    if enqueued is None or scheduled is None:
        return None
    return scheduled - enqueued


class OpenAIBackend:
    """Streaming POSTs to {base_url}/chat/completions; media as data URLs; output tokens from the usage chunk."""

    name = "openai"

    def __init__(self, base_url: str, model: str, request_timeout_s: float | None = None) -> None:
        import httpx

        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(request_timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
            trust_env=False,  # a benchmark measures the server, never a proxy picked up from the environment
        )

    def prepare(self, spec: RequestSpec) -> tuple[RequestSpec, bytes]:
        parts = []
        for item in spec.media:
            url = f"data:{item.mime_type};base64,{base64.b64encode(item.data).decode('ascii')}"
            parts.append({"type": f"{item.modality}_url", f"{item.modality}_url": {"url": url}})
        body = {
            "model": self.model,
            "messages": chat_messages(spec, parts),
            "max_tokens": spec.output_len,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        return spec, json.dumps(body).encode()

    async def send(self, prepared: tuple[RequestSpec, bytes], request_id: str, arrival_time: float) -> RequestRecord:
        spec, body = prepared
        send_time = time.perf_counter()
        token_times: list[float] = []
        usage = None
        try:
            headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
            async with self.client.stream("POST", self.url, content=body, headers=headers) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    return _failure(spec, arrival_time, send_time, f"HTTP {response.status_code}: {text}")
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        return _failure(spec, arrival_time, send_time, f"stream error: {chunk['error']}", token_times)
                    if any((choice.get("delta") or {}).get("content") for choice in chunk.get("choices") or ()):
                        token_times.append(time.perf_counter())
                    usage = chunk.get("usage") or usage
        except Exception as exc:  # connection refused, timeout, malformed stream: a failed request
            return _failure(spec, arrival_time, send_time, _describe(exc), token_times)
        end_time = time.perf_counter()
        if usage is None:
            return _failure(spec, arrival_time, send_time, "the stream carried no usage chunk", token_times)
        if not token_times:
            return _failure(spec, arrival_time, send_time, "the stream carried no content")
        return RequestRecord(
            index=spec.index,
            success=True,
            arrival_time=arrival_time,
            send_time=send_time,
            end_time=end_time,
            token_times=tuple(token_times),
            output_tokens=int(usage.get("completion_tokens", 0)),
            expected_output_tokens=spec.output_len,
            prompt_tokens=usage.get("prompt_tokens"),
        )

    async def engine_counters(self) -> None:
        return None

    async def close(self) -> None:
        await self.client.aclose()
