"""The engine's side of the video decode stage: which request each decode job serves, and the one place where the
stage's events become encoder work.

A request with videos joins the scheduler when it arrives; each of its videos is submitted to the stage as one job
(`start`). Its chunks sit in the encoder queue waiting for their frames (`inputs_pending`) while the LM prefills the
text before them. `take_events` runs on the engine thread at the start of every step: for each `VideoChunkReady` it
puts the chunk's pixel values into the request's feature (kept for re-encoding after an eviction) and hands them to
the encoder scheduler (`provide_inputs`), so the chunk can be encoded, and then prefilled, while later chunks are
still decoding; a `VideoDone` stamps the request's decode times, or, when the decode failed, reports the request so
the engine ends it with the error. A request that finishes or is aborted has its jobs cancelled (`cancel`); late
events of a cancelled job never arrive.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

from spaceserve.core.errors import InvalidInputError
from spaceserve.core.request import Request
from spaceserve.multimodal.video.stage import VideoChunkReady, VideoDecodeStage
from spaceserve.sched.encoder_scheduler import EncoderScheduler

DECODE_FAILURE_PREFIX = "video decoding failed: "
"""Starts the error of a request whose video failed to decode for a reason other than its input (a decoder or device
fault); a failure caused by the input (InvalidInputError) carries that error's own message."""


@dataclass(frozen=True)
class _Job:
    request_id: str
    first_feature: int
    """Index in the request's mm_features of the video's first chunk."""


class VideoJobs:
    def __init__(
        self, stage: VideoDecodeStage, encoder_scheduler: EncoderScheduler, requests: Mapping[str, Request]
    ) -> None:
        self.stage = stage
        self.encoder_scheduler = encoder_scheduler
        self.requests = requests
        self._jobs: dict[int, _Job] = {}
        self._jobs_of_request: dict[str, list[int]] = {}

    @property
    def num_requests(self) -> int:
        """Requests with a video still being decoded."""
        return len(self._jobs_of_request)

    @property
    def busy(self) -> bool:
        return bool(self._jobs)

    def start(self, request: Request) -> None:
        """Submit each of the request's videos (it is in the scheduler already)."""
        for first_feature, work in request.pending_mm_work:
            job_id = self.stage.submit(work)
            self._jobs[job_id] = _Job(request.request_id, first_feature)
            self._jobs_of_request.setdefault(request.request_id, []).append(job_id)
        request.pending_mm_work = []

    def cancel(self, request_id: str) -> None:
        for job_id in self._jobs_of_request.pop(request_id, ()):
            self.stage.cancel(job_id)
            del self._jobs[job_id]

    def wait(self, timeout: float) -> None:
        """Block until the stage has an event (or `timeout` passes); the next `take_events` takes it."""
        self.stage.wait(timeout)

    def take_events(self) -> list[tuple[Request, str]]:
        """Apply the stage's events; returns the requests whose video failed, with the error to end them with."""
        failed: list[tuple[Request, str]] = []
        now = time.monotonic()
        for event in self.stage.poll():
            job = self._jobs[event.job_id]  # a cancelled job's events never come back from poll
            request = self.requests[job.request_id]  # a request that finished had its jobs cancelled
            if isinstance(event, VideoChunkReady):
                self._chunk_ready(request, job.first_feature + event.chunk_index, event.pixel_values, now)
                continue
            del self._jobs[event.job_id]
            jobs = self._jobs_of_request[job.request_id]
            jobs.remove(event.job_id)
            if not jobs:
                del self._jobs_of_request[job.request_id]
            if event.error is not None:
                error = event.error
                message = str(error) if isinstance(error, InvalidInputError) else f"{DECODE_FAILURE_PREFIX}{error!r}"
                if all(request is not other for other, _ in failed):  # its first failed video names the error
                    failed.append((request, message))
                continue
            start, end = request.video_decode_start_time, request.video_decode_end_time
            request.video_decode_start_time = event.start_time if start is None else min(start, event.start_time)
            request.video_decode_end_time = event.end_time if end is None else max(end, event.end_time)
        return failed

    def _chunk_ready(self, request: Request, index: int, pixel_values, now: float) -> None:
        feature = replace(request.mm_features[index], pixel_values=pixel_values, inputs_pending=False)
        request.set_mm_feature(index, feature)
        for request_id in self.encoder_scheduler.provide_inputs(feature):
            waiter = self.requests.get(request_id)
            if waiter is not None and waiter.encoder_enqueued_time is None:
                waiter.encoder_enqueued_time = now
