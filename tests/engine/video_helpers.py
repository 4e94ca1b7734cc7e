"""Helpers for engine tests with videos: a request's videos put back together from their chunks, and a decode
whose later frames are held back until the test lets them through."""

from __future__ import annotations

import threading

import torch

from spaceserve.multimodal.video import decode as decode_module


def whole_videos(request) -> list[tuple[tuple[int, int, int], torch.Tensor]]:
    """(grid_thw, pixel_values) of each video of the request, its chunks' rows concatenated in order."""
    videos: list[list] = []
    for feature in request.mm_features:
        if feature.modality != "video":
            continue
        assert feature.chunk is not None and not feature.inputs_pending
        if feature.chunk.index == 0:
            videos.append([])
        videos[-1].append(feature)
    result = []
    for chunks in videos:
        assert [c.chunk.index for c in chunks] == list(range(chunks[0].chunk.num_chunks))
        grid = (sum(c.grid_thw[0] for c in chunks), *chunks[0].grid_thw[1:])
        result.append((grid, torch.cat([c.pixel_values for c in chunks])))
    return result


class HeldDecode:
    """Wraps decode.start_decode: frames from `open_frames` on are reported decoded only once `release` is set
    (or never, until then); `started` is set when a decode starts. Use as monkeypatch.setattr(decode_module,
    "start_decode", HeldDecode(open_frames=...))."""

    def __init__(self, open_frames: int = 0, fail_after: BaseException | None = None) -> None:
        self.open_frames = open_frames
        self.fail_after = fail_after
        self.started = threading.Event()
        self.release = threading.Event()
        self.real = decode_module.start_decode
        self.num_decodes = 0

    def __call__(self, *args, **kwargs):
        decode = self.real(*args, **kwargs)
        self.num_decodes += 1
        self.started.set()
        real_wait = decode.wait_for
        held = self

        def wait_for(first, end, timeout=None):
            if end > held.open_frames:
                if not held.release.wait(timeout if timeout is not None else 30):
                    return False
                if held.fail_after is not None:
                    raise held.fail_after
            return real_wait(first, end, timeout)

        decode.wait_for = wait_for
        return decode
