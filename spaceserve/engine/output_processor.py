"""Incremental detokenization and stop strings: turns requests that advanced this step into RequestOutputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spaceserve.core.outputs import CompletionOutput, RequestOutput
from spaceserve.core.request import Request
from spaceserve.tokenizer.base import Tokenizer


@dataclass
class _TextState:
    detokenizer: Any
    text: str = ""
    num_tokens_seen: int = 0
    stopped_on: str | None = None


_TIMESTAMPS = (
    "video_decode_start_time",
    "video_decode_end_time",
    "first_scheduled_time",
    "encoder_enqueued_time",
    "encoder_scheduled_time",
    "encoder_end_time",
    "first_token_time",
    "finished_time",
)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, _TextState] = {}

    def add_request(self, request: Request) -> None:
        skip = request.sampling_params.skip_special_tokens
        self._states[request.request_id] = _TextState(self.tokenizer.new_detokenizer(skip))

    def remove_request(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def update_text(self, requests: list[Request]) -> list[str]:
        """Detokenize the new tokens; returns the ids of requests that just hit a stop string (the caller
        finishes them)."""
        stopped = []
        for request in requests:
            state = self._states[request.request_id]
            self._advance_text(request, state)
            if request.is_finished and state.stopped_on is None:
                state.text += state.detokenizer.finish()  # an incomplete trailing character becomes U+FFFD
            if state.stopped_on is not None and request.stop_reason is None:
                request.stop_reason = state.stopped_on
                stopped.append(request.request_id)
        return stopped

    def make_output(self, request: Request, error: str | None = None) -> RequestOutput:
        state = self._states.get(request.request_id)
        completion = CompletionOutput(
            index=0,
            text=state.text if state else "",
            token_ids=list(request.output_token_ids),
            finish_reason="error" if error is not None else request.status.finish_reason,
            stop_reason=request.stop_reason,
        )
        metrics = {"arrival_time": request.arrival_time}
        for name in _TIMESTAMPS:
            value = getattr(request, name)
            if value is not None:
                metrics[name] = value
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=list(request.prompt_token_ids),
            outputs=[completion],
            finished=request.is_finished or error is not None,
            error=error,
            metrics=metrics,
        )

    def _advance_text(self, request: Request, state: _TextState) -> None:
        params = request.sampling_params
        new_tokens = request.output_token_ids[state.num_tokens_seen :]
        state.num_tokens_seen = request.num_output_tokens
        for token in new_tokens:
            if state.stopped_on is not None:
                return
            if token in request.eos_token_ids and not params.ignore_eos and request.is_finished:
                continue  # the EOS that ended the request is not part of the text
            previous_len = len(state.text)
            state.text += state.detokenizer.step(token) or ""
            if params.stop and request.num_output_tokens >= params.min_tokens:
                self._check_stop_strings(state, params.stop, params.include_stop_str_in_output, previous_len)
                if state.stopped_on is not None:
                    return

    @staticmethod
    def _check_stop_strings(state: _TextState, stops: tuple[str, ...], include: bool, previous_len: int) -> None:
        longest = max(len(s) for s in stops)
        search_from = max(0, previous_len - longest + 1)
        best: tuple[int, str] | None = None
        for stop in stops:
            at = state.text.find(stop, search_from)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is not None:
            at, stop = best
            state.text = state.text[: at + len(stop)] if include else state.text[:at]
            state.stopped_on = stop
