"""The encoder worker as a process of its own: the engine core's side (runtime/encoder_proc.py is the other).

The same contract as the worker thread (runtime/encoder_worker.py: submit / poll / has_room / stats / shutdown, at
most `max_in_flight` batches), so EncoderStage drives both alike; what differs is where the tower runs. Here it
runs in another process, which never shares a GIL with the LM loop and, under an MPS daemon, runs its kernels
concurrently with the core's: capped by an active-thread percentage (`mps`) or on its side of a green-context split
(`space`), see runtime/mps.py.

- Start-up: the core allocates the embedding ring (runtime/embedding_ring.py: a slot per batch in flight, each as
  large as the largest batch), writes the process's set-up (config, mode, splits, the ring's handle) to a private
  directory, starts `python -m spaceserve.runtime.encoder_proc` with its MPS environment, and waits until it has
  built the tower, captured its graphs and mapped the ring. That happens before the core sizes its KV cache, so
  what the encoder process holds is already gone from the device's free memory.
- A batch: `submit` takes a free slot and sends the batch (pixels as frames; pixels the core holds on the device,
  decoded videos, go to the host first); the process launches it, records the slot's event and says so; `poll`
  takes those reports and, for every batch whose event has completed (queried, never waited on from the LM loop),
  copies its rows out of the slot and frees the slot.
- Failure: a batch that raised in the process comes back with its error (EncoderStage treats it like the thread's:
  a device fault). A process that ends (killed, crashed) is seen by `poll` (its exit status is checked on every
  call): every batch in flight comes back with EncoderProcessDiedError, `dead_error` is set and `has_room` stays
  False, so EncoderStage fails the requests waiting for images and the engine keeps serving the rest.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
import zmq

from spaceserve.child_pythonpath import child_pythonpath
from spaceserve.config import EngineConfig
from spaceserve.core import errors
from spaceserve.core.encoder_messages import (
    BatchEncoded,
    EncodeBatch,
    EncodeItem,
    EncoderFailed,
    EncoderOutput,
    EncoderReady,
    ShutdownEncoder,
)
from spaceserve.core.errors import SpaceServeError
from spaceserve.core.multimodal import MultiModalFeature, RawImage
from spaceserve.core.scheduler_output import EncoderBatch
from spaceserve.engine.serial import MessageDecoder, MessageEncoder
from spaceserve.runtime.device import device_with_index
from spaceserve.runtime.embedding_ring import EmbeddingRing
from spaceserve.runtime.encoder_proc import EncoderProcessSetup
from spaceserve.runtime.encoder_worker import EncodedBatch, EncoderWorkerStats
from spaceserve.runtime.mps import apply_environment, encoder_process_environment
from spaceserve.runtime.multiplex import ExecutionLayout
from spaceserve.runtime.sm_partition import SMPartition

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 900.0
"""Building a real-size tower and capturing its graphs on every stream takes a minute or two on a GPU."""
_SHUTDOWN_TIMEOUT_S = 10.0
_WAIT_STEP_S = 0.0002


class EncoderProcessDiedError(SpaceServeError, RuntimeError):
    """The encoder process ended while the engine ran: images can no longer be encoded."""


class EncoderBatchError(SpaceServeError, RuntimeError):
    """The encoder process raised while encoding a batch; the message is its exception."""


@dataclass
class ProcessEncoderStats(EncoderWorkerStats):
    """The thread's totals, as the core sees them: `launch_s` is the encoder process's own launch time, `busy_s`
    runs from submit to the rows being ready (queueing behind the batch ahead included)."""

    copy_out_s: float = 0.0
    """Host time the core spent copying rows out of the ring (the copy and its wait)."""
    copy_out_bytes: int = 0


@dataclass
class _InFlight:
    batch: EncoderBatch
    slot: int
    submitted: float
    on_full_device: bool
    report: BatchEncoded | None = None


class ProcessEncoderWorker:
    def __init__(self, config: EngineConfig, layout: ExecutionLayout, device: torch.device, dtype: torch.dtype,
                 max_in_flight: int = 2, start_timeout_s: float = START_TIMEOUT_S) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        device = device_with_index(device)  # the encoder process, a fresh CUDA context, must be told which one
        self.device = device
        self.max_in_flight = max_in_flight
        self.stats = ProcessEncoderStats()
        self._dead_error: EncoderProcessDiedError | None = None
        self._closed = False
        self._in_flight: dict[int, _InFlight] = {}
        self._free_slots = list(range(max_in_flight))
        self._ids = itertools.count()
        self._readers = layout.lm_streams
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._dir = tempfile.mkdtemp(prefix="spaceserve-encoder-")
        self._context = zmq.Context()
        self._input = self._context.socket(zmq.PUSH)
        self._input.setsockopt(zmq.SNDHWM, 0)
        self._output = self._context.socket(zmq.PULL)
        self._output.setsockopt(zmq.RCVHWM, 0)
        self.process: subprocess.Popen | None = None
        try:
            # one slot holds any batch: at most the budget, or one item alone, which the encoder cache bounds
            slot_rows = max(config.encoder.budget_tokens, config.encoder.cache_tokens)
            self.ring = EmbeddingRing.allocate(max_in_flight, slot_rows, config.model_config.vision.out_hidden_size,
                                               dtype, device)
            input_address, output_address = f"ipc://{self._dir}/input", f"ipc://{self._dir}/output"
            self._input.bind(input_address)
            self._output.bind(output_address)
            self._encoder = MessageEncoder()
            self._decoder = MessageDecoder(EncoderOutput)
            setup = EncoderProcessSetup(
                config=config,
                device=str(device),
                mode=layout.mode,
                split_sms=tuple(p.encoder_sms for p in layout.partitions),
                ring=self.ring.handle(),
            )
            setup_path = os.path.join(self._dir, "setup.pickle")
            with open(setup_path, "wb") as f:
                pickle.dump(setup, f)
            env = dict(os.environ)
            env["PYTHONPATH"] = child_pythonpath(env.get("PYTHONPATH"))
            apply_environment(env, encoder_process_environment(config))
            command = [sys.executable, "-m", "spaceserve.runtime.encoder_proc", setup_path, input_address,
                       output_address, str(logging.getLogger().getEffectiveLevel())]
            self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
            self.info = self._wait_until_ready(start_timeout_s)
            self.ring.unlink()  # both processes have it mapped now
            self.info["ring_bytes"] = self.ring.nbytes
        except BaseException:
            self.shutdown()
            raise

    # ---- the worker contract ---------------------------------------------------------------------------------

    @property
    def dead_error(self) -> EncoderProcessDiedError | None:
        """Set once the process has ended (checked on every read: a waitpid, microseconds), so an idle engine
        reports a death too."""
        self._check_alive()
        return self._dead_error

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def has_room(self) -> bool:
        return not self._closed and bool(self._free_slots) and self.dead_error is None

    def submit(self, batch: EncoderBatch, stream: torch.cuda.Stream | None, on_full_device: bool = False,
               split: SMPartition | None = None) -> None:
        """Send a batch to the encoder process. `stream` is the core's and unused (the process has its own);
        `split` (space) says which side of which split it runs on, `on_full_device` the whole device."""
        if not self.has_room:
            raise RuntimeError(self.dead_error or f"the encoder process already has {self.num_in_flight} batches in "
                                                  f"flight")
        if batch.num_tokens > self.ring.slot_rows:
            raise ValueError(f"a batch of {batch.num_tokens} rows exceeds the ring's {self.ring.slot_rows}-row slots")
        batch_id = next(self._ids)
        slot = self._free_slots.pop()
        message = EncodeBatch(
            batch_id,
            slot,
            [_item(feature) for feature in batch.items],
            split_sms=None if on_full_device or split is None else split.encoder_sms,
            full_device=on_full_device,
        )
        self._in_flight[batch_id] = _InFlight(batch, slot, time.monotonic(), on_full_device)
        try:
            self._input.send_multipart(self._encoder.encode(message), flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            self._check_alive(force_dead=True)

    def poll(self, timeout: float = 0.0) -> list[EncodedBatch]:
        """Finished batches (and, once the process has died, every batch it lost); with `timeout`, waits that long
        for one if none has finished."""
        deadline = time.monotonic() + timeout
        finished: list[EncodedBatch] = []
        while True:
            self._take_reports()
            finished += self._take_ready()
            if not finished and self._in_flight and not self._check_alive():
                finished += self._lose_all()
            if finished or not self._in_flight or time.monotonic() >= deadline:
                break
            if any(flight.report is None for flight in self._in_flight.values()):
                self._output.poll(max(1, int(min(deadline - time.monotonic(), 0.05) * 1000)), zmq.POLLIN)
            else:
                time.sleep(_WAIT_STEP_S)  # launched: its event completes on the device
        if not self._in_flight:
            self._check_alive()
        return finished

    def shutdown(self) -> None:
        """Stop the process (it finishes the batch in hand), close the sockets, remove the private directory.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        process = self.process
        if process is not None and process.poll() is None:
            try:
                self._input.send_multipart(MessageEncoder().encode(ShutdownEncoder()), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            try:
                process.wait(_SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.terminate()
                try:
                    process.wait(_SHUTDOWN_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self._input.close(linger=0)
        self._output.close(linger=0)
        self._context.term()
        ring = getattr(self, "ring", None)
        if ring is not None:
            ring.unlink()
        shutil.rmtree(self._dir, ignore_errors=True)

    # ---- helpers ---------------------------------------------------------------------------------------------

    def _wait_until_ready(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._output.poll(200, zmq.POLLIN):
                message = self._decoder.decode(self._output.recv_multipart(copy=False))
                if isinstance(message, EncoderReady):
                    return dict(message.info)
                if isinstance(message, EncoderFailed):
                    kind = getattr(errors, message.error_type, None)
                    if isinstance(kind, type) and issubclass(kind, Exception):
                        raise kind(message.error)
                    raise EncoderProcessDiedError(f"the encoder process failed to start: {message.error}")
            elif self.process.poll() is not None:
                raise EncoderProcessDiedError(
                    f"the encoder process exited while starting (exit code {self.process.returncode})"
                )
        raise EncoderProcessDiedError(f"the encoder process did not start within {timeout_s:.0f} s")

    def _take_reports(self) -> None:
        while self._output.poll(0, zmq.POLLIN):
            message = self._decoder.decode(self._output.recv_multipart(copy=False))
            if isinstance(message, BatchEncoded):
                flight = self._in_flight.get(message.batch_id)
                if flight is not None:
                    flight.report = message
            elif isinstance(message, EncoderFailed):
                logger.error("the encoder process failed: %s", message.error)

    def _take_ready(self) -> list[EncodedBatch]:
        finished = []
        for batch_id, flight in list(self._in_flight.items()):
            report = flight.report
            if report is None:
                continue
            del self._in_flight[batch_id]
            now = time.monotonic()
            if report.error is not None:
                self._free_slots.append(flight.slot)
                error = EncoderBatchError(report.error)
                finished.append(EncodedBatch(flight.batch, {}, flight.submitted, now, report.launch_s,
                                             flight.on_full_device, error=error))
                continue
            rows = self.ring.copy_out(flight.slot, report.num_rows, self._copy_stream, self._readers)
            self._free_slots.append(flight.slot)
            copied = time.monotonic()
            stats = self.stats
            stats.copy_out_s += copied - now
            stats.copy_out_bytes += rows.numel() * rows.element_size()
            stats.num_batches += 1
            stats.launch_s += report.launch_s
            stats.busy_s += now - flight.submitted
            stats.num_full_device_batches += int(flight.on_full_device)
            split = rows.split([item.num_tokens for item in flight.batch.items])
            embeddings = {item.mm_hash: item_rows for item, item_rows in zip(flight.batch.items, split)}
            finished.append(EncodedBatch(flight.batch, embeddings, flight.submitted, now, report.launch_s,
                                         flight.on_full_device))
        return finished

    def _check_alive(self, force_dead: bool = False) -> bool:
        """False (and dead_error set) once the process has ended."""
        if self._dead_error is not None:
            return False
        if self._closed or self.process is None:
            return True
        code = self.process.poll()
        if code is None and not force_dead:
            return True
        self._dead_error = EncoderProcessDiedError(
            f"the encoder process (pid {self.process.pid}) died (exit code {code}); images can no longer be encoded"
            if code is not None else f"the encoder process (pid {self.process.pid}) is not reachable"
        )
        logger.error("%s", self._dead_error)
        return False

    def _lose_all(self) -> list[EncodedBatch]:
        now = time.monotonic()
        lost = [EncodedBatch(f.batch, {}, f.submitted, now, 0.0, f.on_full_device, error=self._dead_error)
                for f in self._in_flight.values()]
        self._in_flight.clear()
        return lost


def _item(feature: MultiModalFeature) -> EncodeItem:
    pixels, raw = feature.pixel_values, None
    if isinstance(pixels, RawImage):
        pixels, raw = pixels.rgb, (pixels.height, pixels.width)
    if isinstance(pixels, torch.Tensor) and pixels.device.type != "cpu":
        pixels = pixels.cpu()  # videos decoded and preprocessed on the core's device
    return EncodeItem(feature.mm_hash, feature.modality, feature.num_tokens, feature.num_patches,
                      tuple(feature.grid_thw), pixels, raw)
