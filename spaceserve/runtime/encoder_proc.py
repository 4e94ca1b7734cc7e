"""The encoder process (one per GPU): owns the vision tower, its CUDA graphs and the streams it runs on, takes encoder
batches from the engine core and writes their embeddings into the ring the core shared at start-up.

It builds only the tower (runtime/encoder_model.py), on the streams its mode runs on: one stream for `mps` and
`streams`; for `space` a stream over the whole device and the encoder side of every split the core made (the same
driver split in two processes gives the same SMs, so the core's LM side and this process's encoder side are
disjoint), capturing a graph set on each. A batch says which to use. A split it has not seen is made when a batch
first names it, and runs eagerly.

The loop only launches: for each batch it preprocesses raw images on the device, runs the tower on the batch's
stream, writes the rows into the batch's slot and records the slot's event there. A thread of its own (`_Reporter`)
sends each batch's report, in order, once this process has seen the batch's work complete, so the loop goes on
launching while the device runs. Reporting at launch and leaving the core to query the slot's interprocess event was
the first design; on the H200 (driver 580, with and without MPS) the core's query said "written" right after the
event was recorded behind a ~1 s kernel, so the core now never queries it: it copies a batch out once this process
has reported the batch complete, behind a device-side wait on the event. An exception while encoding a batch is reported with that batch; one outside
(start-up, the transport) ends the process with EncoderFailed. It dies with the engine core (PR_SET_PDEATHSIG and a
watch on its parent) and leaves the shutdown to it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import zmq

from spaceserve.config import EngineConfig
from spaceserve.core.encoder_messages import (
    BatchEncoded,
    EncodeBatch,
    EncoderFailed,
    EncoderInput,
    EncoderReady,
    ShutdownEncoder,
)
from spaceserve.core.multimodal import MultiModalFeature, PlaceholderRange, RawImage
from spaceserve.core.scheduler_output import EncoderBatch
from spaceserve.engine.serial import MessageDecoder, MessageEncoder
from spaceserve.runtime.embedding_ring import EmbeddingRing, RingHandle

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderProcessSetup:
    """Everything the process needs, written once by the core (pickled: frozen config dataclasses and the ring's
    handle); every later exchange is a message."""

    config: EngineConfig
    device: str
    mode: str
    """mps, streams or space."""
    split_sms: tuple[int, ...]
    """space: the encoder SM counts of the core's splits."""
    ring: RingHandle


class EncoderServer:
    def __init__(self, setup: EncoderProcessSetup) -> None:
        from spaceserve.models.loader import resolve_dtype
        from spaceserve.runtime.encoder_model import build_vision_model
        from spaceserve.runtime.encoder_runner import EncoderRunner
        from spaceserve.runtime.runner_setup import encoder_runs_eagerly, vision_graph_patch_buckets
        from spaceserve.runtime.vision_graphs import VisionCUDAGraphs

        config = setup.config
        self.device = torch.device(setup.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dtype = resolve_dtype(config.dtype, config.model_config)
        self.model = build_vision_model(
            config.model_config,
            directory=None if config.model_dir is None else Path(config.model_dir),
            load_format=config.load_format,
            dtype=dtype,
            device=self.device,
            seed=config.seed,
        )
        self.mode = setup.mode
        self._default_stream: torch.cuda.Stream | None = None
        self._full_stream: torch.cuda.Stream | None = None
        self._split_streams: dict[int, torch.cuda.Stream] = {}
        if self.device.type == "cuda":
            if setup.mode == "space":
                self._full_stream = torch.cuda.Stream(self.device)
                for count in setup.split_sms:
                    self._split_stream(count)
            else:
                self._default_stream = torch.cuda.Stream(self.device)
        streams = self.streams
        graphs = None
        buckets = vision_graph_patch_buckets(config, self.device)
        if buckets:
            graphs = VisionCUDAGraphs(self.model.visual, buckets, self.device, dtype)
            graphs.capture_on(streams)
        self.runner = EncoderRunner(self.model, self.device, config.image_config, graphs)
        if self.device.type == "cuda" and encoder_runs_eagerly(config, graphs):
            self._reserve_eager_peak(config, streams)
        self.ring = EmbeddingRing.attach(setup.ring)
        if self.ring.buffer.dtype != dtype:
            raise RuntimeError(f"the ring holds {self.ring.buffer.dtype} rows, the tower computes {dtype}")
        self.info: dict[str, Any] = {
            "pid": os.getpid(),
            "device": str(self.device),
            "mode": setup.mode,
            "streams": len(streams),
            "split_sms": sorted(self._split_streams),
            "vision_graph_buckets": list(buckets),
            "vision_graph_bytes": graphs.total_memory_bytes if graphs is not None else 0,
            "ring_slots": self.ring.num_slots,
            "ring_slot_rows": self.ring.slot_rows,
            "mps_active_thread_percentage": os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"),
        }
        if self.device.type == "cuda":
            self.info["memory_reserved_bytes"] = torch.cuda.memory_reserved(self.device)

    @property
    def streams(self) -> list[torch.cuda.Stream | None]:
        if self.device.type != "cuda":
            return [None]
        streams = [self._default_stream, self._full_stream, *self._split_streams.values()]
        return [s for s in streams if s is not None]

    def _split_stream(self, encoder_sms: int) -> torch.cuda.Stream:
        stream = self._split_streams.get(encoder_sms)
        if stream is None:
            from spaceserve.runtime.sm_partition import get_partition_manager

            partition = get_partition_manager(self.device).partition(encoder_sms)
            if partition.encoder_sms != encoder_sms:
                raise RuntimeError(f"the split for {encoder_sms} encoder SMs gives {partition.encoder_sms} here: the "
                                   f"engine core and the encoder process would not share the device as intended")
            stream = self._split_streams[encoder_sms] = partition.encoder_stream
        return stream

    def _stream_for(self, message: EncodeBatch) -> torch.cuda.Stream | None:
        if self.device.type != "cuda":
            return None
        if message.full_device or (self.mode == "space" and message.split_sms is None):
            return self._full_stream or self._default_stream
        if message.split_sms is not None:
            return self._split_stream(message.split_sms)
        return self._default_stream

    def _reserve_eager_peak(self, config: EngineConfig, streams: list[torch.cuda.Stream | None]) -> None:
        """Run the largest eager batch once on each stream, so the caching allocator holds its peak from the start
        (the core sizes its KV cache after this process is ready, from what the device has left)."""
        from spaceserve.runtime.memory_planner import run_largest_encoder_batch

        for stream in streams:
            with torch.cuda.stream(stream):
                run_largest_encoder_batch(self.model, config.image_config, config.encoder.budget_tokens, self.device)
        torch.cuda.synchronize(self.device)

    def encode(self, message: EncodeBatch) -> tuple[BatchEncoded, torch.cuda.Event | None]:
        """The batch launched, its report, and (CUDA) an event after its work in this process's own context."""
        start = time.monotonic()
        batch = EncoderBatch(items=tuple(_feature(item) for item in message.items))
        stream = self._stream_for(message)
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                embeddings = self.runner.execute(batch)
                num_rows = self.ring.write(message.slot, [embeddings[item.mm_hash] for item in batch.items], stream)
                done = None
                if stream is not None:
                    done = torch.cuda.Event()
                    done.record(stream)
        except Exception as exc:  # noqa: BLE001 - the core decides what fails
            logger.exception("encoding batch %d failed", message.batch_id)
            return BatchEncoded(message.batch_id, error=f"{type(exc).__name__}: {exc}"), None
        return BatchEncoded(message.batch_id, num_rows=num_rows, launch_s=time.monotonic() - start), done


class _Reporter:
    """Sends each report once its batch's work has completed on the device, in order, from a thread of its own."""

    def __init__(self, send) -> None:
        self._send = send
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="encoder-reporter", daemon=True)
        self._thread.start()

    def report(self, message: BatchEncoded, done: torch.cuda.Event | None) -> None:
        self._queue.put((message, done))

    def close(self, timeout_s: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)  # a batch stuck on the device must not hold the process's exit

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            message, done = item
            if done is not None:
                try:
                    done.synchronize()  # releases the GIL: the loop keeps launching
                except Exception as exc:  # noqa: BLE001 - a device fault: the batch fails, the core decides
                    message = BatchEncoded(message.batch_id, error=f"{type(exc).__name__}: {exc}")
            try:
                self._send(message)
            except Exception:  # noqa: BLE001 - the transport is gone: the main loop sees it too and ends
                logger.exception("sending the report of batch %d failed", message.batch_id)
                return


def _feature(item) -> MultiModalFeature:
    pixels = item.pixel_values
    if item.raw_image is not None:
        pixels = RawImage(pixels, *item.raw_image)
    return MultiModalFeature(
        mm_hash=item.mm_hash,
        modality=item.modality,
        placeholder=PlaceholderRange(0, item.num_tokens),
        num_patches=item.num_patches,
        grid_thw=tuple(item.grid_thw),
        pixel_values=pixels,
    )


def run_encoder_process(setup_path: str, input_address: str, output_address: str, log_level: int) -> None:
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [encoder] %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    from spaceserve.engine.core_proc import _die_with_parent

    _die_with_parent()
    context = zmq.Context()
    inputs = context.socket(zmq.PULL)
    inputs.setsockopt(zmq.RCVHWM, 0)
    inputs.connect(input_address)
    outputs = context.socket(zmq.PUSH)
    outputs.setsockopt(zmq.SNDHWM, 0)
    outputs.setsockopt(zmq.LINGER, 2000)
    outputs.connect(output_address)
    encoder, decoder = MessageEncoder(), MessageDecoder(EncoderInput)
    sending = threading.Lock()  # the loop and the reporter thread share the socket

    def send(message: Any) -> None:
        with sending:
            outputs.send_multipart(encoder.encode(message), copy=False)

    reporter: _Reporter | None = None

    try:
        try:
            with open(setup_path, "rb") as f:
                setup: EncoderProcessSetup = pickle.load(f)
            server = EncoderServer(setup)
        except Exception as exc:  # noqa: BLE001 - the core raises it as its start-up error
            logger.exception("the encoder process failed to start")
            send(EncoderFailed(str(exc), type(exc).__name__))
            return
        send(EncoderReady(server.info))
        reporter = _Reporter(send)
        while True:
            message = decoder.decode(inputs.recv_multipart(copy=False))
            if isinstance(message, ShutdownEncoder):
                return
            reporter.report(*server.encode(message))
    except Exception as exc:  # noqa: BLE001 - the transport broke: say so if possible, then end
        logger.exception("the encoder process failed")
        with contextlib.suppress(Exception):
            send(EncoderFailed(f"{type(exc).__name__}: {exc}", type(exc).__name__))
    finally:
        if reporter is not None:
            reporter.close()  # the reports of batches already launched go out first
        inputs.close(linger=0)
        outputs.close()
        context.term()


def main(argv: list[str]) -> None:
    setup_path, input_address, output_address, log_level = argv
    run_encoder_process(setup_path, input_address, output_address, int(log_level))


if __name__ == "__main__":
    main(sys.argv[1:])
