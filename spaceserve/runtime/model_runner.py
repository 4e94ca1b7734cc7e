"""Runs one scheduled LM step: prepares the inputs (input_batch.py), runs the language model over the paged KV
cache (a CUDA-graph replay for decode steps, eagerly otherwise), samples on the device and brings back only the
sampled token ids.

Stable interface (the engine and the benchmarks time it):
- `launch(scheduled, encoder_outputs) -> StepHandle`: enqueue everything on the runner's stream; no host sync.
- `collect(handle) -> ModelRunnerOutput`: wait for that step's sampled ids (the step's one device->host sync).
- `execute(scheduled, encoder_outputs)` = `collect(launch(...))`.
Steps may be launched before the previous one is collected (overlapped scheduling): a decode row whose input is
the token the previous launch sampled reads it from that launch's device tensor, so the token never makes a round
trip through the host before the next step starts.
All work runs on `stream`, graphs included, so a runner on a partition's stream keeps its whole step on that
partition. Default: the current stream, unless that is the legacy default stream, on which CUDA cannot capture
graphs; then a stream of the runner's own. Each launch first waits for work queued on the caller's stream
(encoder outputs). `capture_cuda_graphs` can capture one graph set per stream (a graph runs on the SMs of the
stream it was captured on), and `use_stream` switches between them between steps.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from spaceserve.core.request import Request
from spaceserve.core.sampling_params import SamplingParams
from spaceserve.core.scheduler_output import ModelRunnerOutput, ScheduledSequence, SchedulerOutput, TokenLogprobs
from spaceserve.layers.attention import AttentionBackend
from spaceserve.layers.sampler import (
    LogprobsTensors,
    SamplingRow,
    sample_on_device,
    sample_with_logprobs,
    sampling_metadata_from_rows,
)
from spaceserve.runtime.cuda_graphs import DecodeCUDAGraphs, is_graphable
from spaceserve.runtime.input_batch import InputBatch, ModelInputs

_NUM_OUTPUT_BUFFERS = 2


@dataclass(frozen=True)
class StepHandle:
    """A launched step: its sampled ids land in `sampled_ids` (host) once `done` has fired."""

    request_ids: tuple[str, ...]
    sampled_ids: torch.Tensor | None
    done: torch.cuda.Event | None
    graphed: bool
    gpu_span: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
    """Timing events recorded before and after the step's work on its stream (CUDA only)."""
    logprobs: LogprobsTensors | None = None
    """On the device, for the rows whose requests asked for log-probabilities (computed before `done`)."""
    num_logprobs: tuple[int | None, ...] = ()


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        block_size: int,
        backend: AttentionBackend,
        device: torch.device,
        *,
        max_num_tokens: int = 8192,
        max_num_seqs: int = 256,
        max_model_len: int = 4096,
        stream: torch.cuda.Stream | None = None,
    ) -> None:
        self.model = model
        self.language_model = model.language_model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.backend = backend
        self.device = device
        self.vocab_size = self.language_model.cfg.vocab_size
        self.stream = stream if stream is not None or device.type != "cuda" else _runner_stream(device)
        self._sizes = dict(max_num_tokens=max_num_tokens, max_num_seqs=max_num_seqs, max_model_len=max_model_len)
        self.input_batch = InputBatch(**self._sizes, block_size=block_size, vocab_size=self.vocab_size, device=device)
        pin = device.type == "cuda"
        self._sampled_host = [
            torch.empty(max_num_seqs, dtype=torch.int64, pin_memory=pin) for _ in range(_NUM_OUTPUT_BUFFERS)
        ]
        self._sampled_done = [torch.cuda.Event() if pin else None for _ in range(_NUM_OUTPUT_BUFFERS)]
        self._next_output = 0
        # the last launch's sampled ids, still on the device, and each request's row in them
        self._previous_tokens: torch.Tensor | None = None
        self._previous_rows: dict[str, int] = {}
        self.cuda_graphs: DecodeCUDAGraphs | None = None
        self._graphs_by_stream: dict[torch.cuda.Stream, DecodeCUDAGraphs] = {}
        self.num_graphed_steps = 0
        self.num_eager_steps = 0
        self.num_placeholder_tokens_fed = 0
        # tensor parallel (runtime/multiproc_executor.py): rank 0 hands each step's inputs to the other ranks; every
        # rank samples unseeded rows from a generator seeded alike, so all ranks draw the same tokens
        self.step_publisher: Callable[[ModelInputs], None] | None = None
        self.sampling_generator: torch.Generator | None = None

    # ---- setup -------------------------------------------------------------------------------------------

    def sibling(self, stream: torch.cuda.Stream | None) -> ModelRunner:
        """A runner over the same model, KV cache and seeded-sampling generators, with input buffers of its own, on
        `stream` (eager steps only): it runs prefill steps while this one's steps are in flight
        (engine/prefill_lane.py). A request's generator is shared, so its tokens do not depend on which runner
        sampled them."""
        other = ModelRunner(self.model, self.kv_caches, self.block_size, self.backend, self.device, **self._sizes,
                            stream=stream)
        other.input_batch.share_generators(self.input_batch)
        other.sampling_generator = self.sampling_generator
        return other

    def initialize_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        if self.cuda_graphs is not None:
            raise RuntimeError("the KV cache cannot change once CUDA graphs captured it")
        self.kv_caches = kv_caches

    def capture_cuda_graphs(self, sizes: tuple[int, ...], other_streams: tuple[torch.cuda.Stream, ...] = ()) -> None:
        """Capture decode graphs of these batch sizes on the runner's stream and on each of `other_streams` (CUDA
        and a graph-capable backend)."""
        if self.device.type != "cuda" or not getattr(self.backend, "supports_cuda_graphs", False):
            raise RuntimeError(f"CUDA graphs need a CUDA device and a backend that supports them, not {self.backend.name}")
        for stream in (self.stream, *other_streams):
            if stream in self._graphs_by_stream:
                continue
            graphs = DecodeCUDAGraphs(self._decode_logits, self.input_batch, sizes, self.vocab_size, stream)
            graphs.capture()
            self._graphs_by_stream[stream] = graphs
        self.cuda_graphs = self._graphs_by_stream[self.stream]

    def use_stream(self, stream: torch.cuda.Stream) -> None:
        """Run the next steps on `stream` (its own graph set if one was captured). Work already queued on the
        previous stream comes first."""
        if stream == self.stream:
            return
        stream.wait_stream(self.stream)
        self.stream = stream
        if self._graphs_by_stream:
            self.cuda_graphs = self._graphs_by_stream.get(stream)

    def release(self, request_id: str) -> None:
        self.input_batch.release(request_id)

    # ---- one step ----------------------------------------------------------------------------------------

    def execute(self, scheduled: SchedulerOutput, encoder_outputs: Mapping[str, torch.Tensor]) -> ModelRunnerOutput:
        return self.collect(self.launch(scheduled, encoder_outputs))

    @torch.inference_mode()
    def launch(self, scheduled: SchedulerOutput, encoder_outputs: Mapping[str, torch.Tensor]) -> StepHandle:
        if not scheduled.sequences:
            for request_id in scheduled.preempted_request_ids:
                self.input_batch.forget_blocks(request_id)
            return StepHandle((), None, None, graphed=False)
        with self._on_stream():
            span = _timing_events() if self.device.type == "cuda" else None
            if span is not None:
                span[0].record()
            padded = None
            if self.cuda_graphs is not None and is_graphable(scheduled):
                padded = self.cuda_graphs.padded_size(len(scheduled.sequences))
            inputs = self.input_batch.prepare(scheduled, pad_to=padded, previous_sampled_rows=self._previous_rows)
            # --- tensor parallel (runtime/multiproc_executor.py): the other ranks get these inputs before rank 0
            if self.step_publisher is not None:
                self.step_publisher(inputs)
            # ---
            return self._run_prepared(inputs, encoder_outputs, span, scheduled)

    @torch.inference_mode()
    def launch_prepared(
        self, prepare: Callable[[], ModelInputs], encoder_outputs: Mapping[str, torch.Tensor]
    ) -> StepHandle:
        """Prepare inputs on the runner's stream by other means than a SchedulerOutput (a tensor-parallel rank
        rebuilds rank 0's: runtime/worker.py), then run and sample them as `launch` does."""
        with self._on_stream():
            return self._run_prepared(prepare(), encoder_outputs, None)

    def _run_prepared(
        self,
        inputs: ModelInputs,
        encoder_outputs: Mapping[str, torch.Tensor],
        span: tuple[torch.cuda.Event, torch.cuda.Event] | None,
        scheduled: SchedulerOutput | None = None,
    ) -> StepHandle:
        if inputs.placeholder_rows is not None:  # overlapped scheduling: tokens the previous launch sampled
            fed = self._previous_tokens.index_select(0, inputs.placeholder_sources)
            inputs.input_ids.index_copy_(0, inputs.placeholder_rows, fed)
            self.num_placeholder_tokens_fed += fed.shape[0]
        padded = inputs.padded_size
        if padded is not None:
            logits = self.cuda_graphs.replay(padded)[: len(inputs.sampled_request_ids)]
            self.num_graphed_steps += 1
        else:
            logits = self._eager_logits(inputs, encoder_outputs)
            self.num_eager_steps += 1
        if not inputs.sampled_request_ids:
            if span is not None:
                span[1].record()
            return StepHandle((), None, None, graphed=False, gpu_span=span)
        tokens, logprobs = sample_with_logprobs(logits, inputs.sampling, self.sampling_generator)
        self._previous_tokens = tokens
        self._previous_rows = {request_id: row for row, request_id in enumerate(inputs.sampled_request_ids)}
        index = self._next_output
        self._next_output = (index + 1) % _NUM_OUTPUT_BUFFERS
        done = self._sampled_done[index]
        if done is not None:
            done.synchronize()  # the step that last used this buffer has been collected (or at least landed)
        host = self._sampled_host[index][: tokens.shape[0]]
        host.copy_(tokens, non_blocking=True)
        if done is not None:
            done.record()
        if span is not None:
            span[1].record()
        num_logprobs = ()
        if logprobs is not None and scheduled is not None:  # rank 0 reports them; other ranks only keep step
            num_logprobs = _num_logprobs(scheduled, inputs.sampled_request_ids)
        return StepHandle(inputs.sampled_request_ids, host, done, graphed=padded is not None, gpu_span=span,
                          logprobs=logprobs if scheduled is not None else None, num_logprobs=num_logprobs)

    @property
    def last_sampled(self) -> torch.Tensor | None:
        """The last step's sampled ids on the device (every tensor-parallel rank holds its own, equal to rank 0's)."""
        return self._previous_tokens

    def collect(self, handle: StepHandle) -> ModelRunnerOutput:
        if handle.sampled_ids is None:
            return ModelRunnerOutput({})
        if handle.done is not None:
            handle.done.synchronize()
        sampled = dict(zip(handle.request_ids, handle.sampled_ids.tolist()))
        return ModelRunnerOutput(sampled, _host_logprobs(handle))

    def _on_stream(self):
        if self.stream is None:
            return contextlib.nullcontext()
        current = torch.cuda.current_stream(self.device)
        if current != self.stream:
            self.stream.wait_stream(current)  # encoder outputs and other work queued by the caller come first
        return torch.cuda.stream(self.stream)

    def _decode_logits(self, inputs: ModelInputs) -> torch.Tensor:
        """Every row's logits: the forward a decode graph captures (no image rows, every row sampled)."""
        embeds = self.language_model.embed(inputs.input_ids)
        hidden = self.language_model(embeds, inputs.positions, self.kv_caches, inputs.attn_metadata, self.backend)
        return self.language_model.compute_logits(hidden)

    def _eager_logits(self, inputs: ModelInputs, encoder_outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        embeds = self.language_model.embed(inputs.input_ids)
        for splice in inputs.image_splices:
            rows = encoder_outputs[splice.mm_hash][splice.source_row : splice.source_row + splice.length]
            embeds[splice.row : splice.row + splice.length] = rows.to(embeds.dtype)
        hidden = self.language_model(embeds, inputs.positions, self.kv_caches, inputs.attn_metadata, self.backend)
        if not inputs.sampled_request_ids:
            return hidden[:0]
        return self.language_model.compute_logits(hidden[inputs.logits_indices])

    # ---- memory profiling --------------------------------------------------------------------------------

    @torch.inference_mode()
    def profile_run(self, num_tokens: int, max_model_len: int, max_num_seqs: int) -> int:
        """The largest eager step, for peak memory: a prefill of `num_tokens` prompt tokens in as few sequences as
        max_model_len allows (the largest attention), over a scratch KV cache just large enough; then sampling
        `max_num_seqs` rows with top-k/top-p (the largest sampler). Returns the scratch KV bytes, which a real step
        does not add (the KV cache is budgeted separately)."""
        if not self.kv_caches:
            raise RuntimeError("profile_run copies the KV layout from the runner's caches (allocate one block each)")
        num_tokens = min(num_tokens, max_model_len * max_num_seqs)  # a step holds at most max_num_seqs sequences
        lengths = [min(max_model_len, num_tokens - start) for start in range(0, num_tokens, max_model_len)]
        blocks_needed = sum(-(-n // self.block_size) for n in lengths)
        saved = self.kv_caches
        shape = (2, blocks_needed, *saved[0].shape[2:])
        scratch = [torch.empty(shape, dtype=saved[0].dtype, device=self.device) for _ in saved]
        self.kv_caches = scratch
        generator = torch.Generator().manual_seed(0)
        params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, max_tokens=1)
        sequences, next_block = [], 0
        for i, length in enumerate(lengths):
            ids = torch.randint(0, self.vocab_size, (length,), generator=generator).tolist()
            request = Request(f"profile-{i}", ids, params, mrope_positions=torch.arange(length).expand(3, -1))
            num_blocks = -(-length // self.block_size)
            sequences.append(ScheduledSequence(request, 0, length, tuple(range(next_block, next_block + num_blocks)), True))
            next_block += num_blocks
        try:
            self.execute(SchedulerOutput(tuple(sequences)), {})
        finally:
            for seq in sequences:
                self.release(seq.request.request_id)
            self.kv_caches = saved
        logits = torch.randn(max_num_seqs, self.vocab_size, device=self.device)
        del sequences
        rows = [SamplingRow(params, None)] * max_num_seqs
        sample_on_device(logits, sampling_metadata_from_rows(rows, self.vocab_size, self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return sum(cache.numel() * cache.element_size() for cache in scratch)

    @torch.inference_mode()
    def profile_decode_step(self, size: int) -> None:
        """One eager decode forward of `size` padding rows (slot -1: nothing is written), as a graph of that size
        runs it; its peak stands in for the CUDA-graph pool."""
        with self._on_stream():
            inputs = self.input_batch.prepare(SchedulerOutput(()), pad_to=size)
            self._decode_logits(inputs)


def _timing_events() -> tuple[torch.cuda.Event, torch.cuda.Event]:
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def _num_logprobs(scheduled: SchedulerOutput, request_ids: tuple[str, ...]) -> tuple[int | None, ...]:
    wanted = {s.request.request_id: s.request.sampling_params.logprobs for s in scheduled.sequences}
    return tuple(wanted[request_id] for request_id in request_ids)


def _host_logprobs(handle: StepHandle) -> dict[str, TokenLogprobs] | None:
    """The step's log-probabilities on the host, for the requests that asked (each cut to its own top count)."""
    if handle.logprobs is None:
        return None
    token_ids = handle.logprobs.token_ids.tolist()
    values = handle.logprobs.logprobs.tolist()
    ranks = handle.logprobs.sampled_ranks.tolist()
    out = {}
    for row, (request_id, count) in enumerate(zip(handle.request_ids, handle.num_logprobs)):
        if count is not None:
            out[request_id] = TokenLogprobs(tuple(token_ids[row][: 1 + count]), tuple(values[row][: 1 + count]), ranks[row])
    return out


def _runner_stream(device: torch.device) -> torch.cuda.Stream:
    current = torch.cuda.current_stream(device)
    return torch.cuda.Stream(device) if current == torch.cuda.default_stream(device) else current
