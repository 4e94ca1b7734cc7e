"""The front's view of each request: incremental detokenization, stop strings, and the RequestOutputs callers see,
built from the engine core's per-step token deltas (EngineCoreOutput).

A stop string is found here, in text, after the core produced the token that completes it: the request ends at that
token and the caller is told to finish it in the core (which may already have sampled a token or two more; they
are dropped here), so outputs end at exactly the same token wherever the core runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from spaceserve.core.engine_messages import EngineCoreOutput, FinishReason
from spaceserve.core.outputs import CompletionOutput, Logprob, RequestOutput, SampleLogprobs
from spaceserve.core.request import Request
from spaceserve.core.sampling_params import SamplingParams
from spaceserve.tokenizer.base import Tokenizer


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...]
    arrival_time: float
    detokenizer: Any
    output_token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    logprobs: SampleLogprobs | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, RequestState] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._states

    @property
    def num_unfinished(self) -> int:
        return len(self._states)

    def request_ids(self) -> list[str]:
        return list(self._states)

    def add_request(self, request: Request) -> None:
        params = request.sampling_params
        self._states[request.request_id] = RequestState(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=list(request.prompt_token_ids),
            params=params,
            eos_token_ids=request.eos_token_ids,
            arrival_time=request.arrival_time,
            detokenizer=self.tokenizer.new_detokenizer(params.skip_special_tokens),
            logprobs=[] if params.logprobs is not None else None,
        )

    def process(self, core_outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """(the RequestOutput of every request that advanced, the ids of requests a stop string just ended: the
        caller finishes them in the core). Outputs of requests already finished here are dropped."""
        outputs, stopped = [], []
        for core_output in core_outputs:
            state = self._states.get(core_output.request_id)
            if state is None:
                continue
            self._advance(state, core_output)
            state.metrics.update(core_output.timestamps or {})
            if state.finish_reason is None and core_output.finish_reason is not None:
                state.finish_reason = core_output.finish_reason.value
                state.stop_reason = core_output.stop_reason
                state.error = core_output.error
                if state.error is None:
                    state.text += state.detokenizer.finish()  # an incomplete trailing character becomes U+FFFD
            elif state.finish_reason is not None:  # ended by a stop string in this output
                stopped.append(state.request_id)
                state.metrics["finished_time"] = time.monotonic()
            outputs.append(self._make_output(state))
            if state.finished:
                del self._states[state.request_id]
        return outputs, stopped

    def abort(self, request_ids: list[str]) -> list[RequestOutput]:
        """End requests here (the caller aborts them in the core); one output for each that was unfinished."""
        outputs = []
        for request_id in request_ids:
            state = self._states.pop(request_id, None)
            if state is not None:
                state.finish_reason = FinishReason.ABORT.value
                state.metrics["finished_time"] = time.monotonic()
                outputs.append(self._make_output(state))
        return outputs

    def fail_all(self, error: str) -> list[RequestOutput]:
        """The core died: every unfinished request ends with `error`."""
        for state in self._states.values():
            state.finish_reason, state.error = FinishReason.ERROR.value, error
        outputs = [self._make_output(state) for state in self._states.values()]
        self._states.clear()
        return outputs

    def _advance(self, state: RequestState, core_output: EngineCoreOutput) -> None:
        params = state.params
        ends_here = core_output.finish_reason is not None
        new_logprobs = core_output.new_logprobs or ()
        for index, token in enumerate(core_output.new_token_ids):
            if state.finish_reason is not None:
                return
            state.output_token_ids.append(token)
            if state.logprobs is not None and index < len(new_logprobs):
                state.logprobs.append(self._logprobs_dict(new_logprobs[index]))
            last = index == len(core_output.new_token_ids) - 1
            if ends_here and last and token in state.eos_token_ids and not params.ignore_eos:
                continue  # the EOS that ended the request is not part of the text
            previous_len = len(state.text)
            state.text += state.detokenizer.step(token) or ""
            if params.stop and len(state.output_token_ids) >= params.min_tokens:
                self._check_stop_strings(state, previous_len)

    def _logprobs_dict(self, entry) -> dict[int, Logprob]:
        """vLLM's shape: {token id: Logprob(logprob, rank, decoded text)}, the sampled token first, then the top."""
        ranks = [entry.sampled_rank, *range(1, len(entry.token_ids))]
        step: dict[int, Logprob] = {}
        for token, value, rank in zip(entry.token_ids, entry.logprobs, ranks):
            if token not in step:
                step[token] = Logprob(value, rank, self.tokenizer.decode([token], skip_special_tokens=False))
        return step

    @staticmethod
    def _check_stop_strings(state: RequestState, previous_len: int) -> None:
        stops = state.params.stop
        longest = max(len(s) for s in stops)
        search_from = max(0, previous_len - longest + 1)
        best: tuple[int, str] | None = None
        for stop in stops:
            at = state.text.find(stop, search_from)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is not None:
            at, stop = best
            state.text = state.text[: at + len(stop)] if state.params.include_stop_str_in_output else state.text[:at]
            state.finish_reason, state.stop_reason = FinishReason.STOP.value, stop

    @staticmethod
    def _make_output(state: RequestState) -> RequestOutput:
        completion = CompletionOutput(
            index=0,
            text=state.text,
            token_ids=list(state.output_token_ids),
            finish_reason=state.finish_reason,
            stop_reason=state.stop_reason,
            logprobs=None if state.logprobs is None else list(state.logprobs),
        )
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=[completion],
            finished=state.finished,
            error=state.error,
            metrics={"arrival_time": state.arrival_time, **state.metrics},
        )
