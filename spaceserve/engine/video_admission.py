"""Requests whose videos the decode stage is still making: they wait here, outside the LM scheduler, and are
admitted once every video of theirs is decoded, sampled and preprocessed (or fail with the decode's error)."""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, replace

from spaceserve.core.errors import InvalidInputError
from spaceserve.core.request import Request, RequestStatus
from spaceserve.multimodal.video.stage import DecodedVideo, VideoDecodeStage

DECODE_FAILURE_PREFIX = "video decoding failed: "
"""Starts the error of a request whose video failed to decode for a reason other than its input (a decoder or device
fault); a failure caused by the input (InvalidInputError) carries that error's own message."""


@dataclass
class _PendingDecode:
    request: Request
    futures: list[tuple[int, Future[DecodedVideo]]]  # (index in request.mm_features, its decode job)


class PendingVideos:
    def __init__(self, stage: VideoDecodeStage) -> None:
        self.stage = stage
        self._pending: dict[str, _PendingDecode] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._pending

    def __len__(self) -> int:
        return len(self._pending)

    def submit(self, request: Request) -> None:
        futures = [(index, self.stage.submit(work)) for index, work in request.pending_mm_work]
        self._pending[request.request_id] = _PendingDecode(request, futures)

    def abort(self, request_id: str) -> Request | None:
        pending = self._pending.pop(request_id, None)
        if pending is None:
            return None
        for _, future in pending.futures:
            future.cancel()  # a job already running finishes into the decode cache, its result unused
        return pending.request

    def take_decoded(self) -> tuple[list[Request], list[tuple[Request, str]]]:
        """(requests whose videos are all ready, with pixel values and hashes filled in; (request, error) for those
        whose decode failed, marked FINISHED_ERROR)."""
        ready, failed = [], []
        for request_id, pending in list(self._pending.items()):
            if not all(future.done() for _, future in pending.futures):
                continue
            del self._pending[request_id]
            request = pending.request
            try:
                decoded = [(index, future.result()) for index, future in pending.futures]
            except Exception as exc:  # noqa: BLE001 - any decode failure ends this request only
                request.status = RequestStatus.FINISHED_ERROR
                message = str(exc) if isinstance(exc, InvalidInputError) else f"{DECODE_FAILURE_PREFIX}{exc!r}"
                failed.append((request, message))
                continue
            for index, video in decoded:
                feature = request.mm_features[index]
                pixel_values = video.processed.pixel_values
                request.set_mm_feature(index, replace(feature, mm_hash=video.mm_hash, pixel_values=pixel_values))
            request.video_decode_start_time = min(video.start_time for _, video in decoded)
            request.video_decode_end_time = max(video.end_time for _, video in decoded)
            request.pending_mm_work = []
            ready.append(request)
        return ready, failed

    def wait(self, timeout_s: float) -> None:
        """Block up to `timeout_s` for any decode to finish (when nothing else can run)."""
        futures = [future for pending in self._pending.values() for _, future in pending.futures]
        if futures:
            wait(futures, timeout_s, FIRST_COMPLETED)

    def shutdown(self) -> None:
        self.stage.shutdown()
