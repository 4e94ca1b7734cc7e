"""Each kind of bad video raises InvalidVideoError naming the problem."""

import io

import av
import numpy as np
import pytest
from PIL import Image

from spaceserve.core.errors import InvalidInputError
from spaceserve.multimodal.video import InvalidVideoError, decode_frames, probe_video
from tests.multimodal.video.clips import clip_bytes


def _frames(count, rng):
    for _ in range(count):
        yield av.VideoFrame.from_ndarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), format="rgb24")


def _encode(target, container_format, count, *, options=None, audio=False):
    rng = np.random.default_rng(count)
    with av.open(target, "w", format=container_format, options=options or {}) as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in _frames(count, rng):
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
        if audio:
            _add_silence(container)


def _add_silence(container):
    stream = container.add_stream("aac", rate=48000)
    for i in range(5):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 48000, i * 1024
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def _expect(source, pattern):
    with pytest.raises(InvalidVideoError, match=pattern):
        decode_frames(source, [0])
    with pytest.raises(InvalidVideoError, match=pattern):
        probe_video(source)


def test_random_bytes_are_not_a_video():
    _expect(np.random.default_rng(5).bytes(4096), "not a readable video")


def test_still_image_is_not_a_video():
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    _expect(buffer.getvalue(), "still image")


def test_empty_input_and_missing_file(tmp_path):
    _expect(b"", "empty")
    _expect(tmp_path / "absent.mp4", "not found")
    with pytest.raises(InvalidVideoError, match="expected a video file path or encoded bytes"):
        probe_video(12345)


def test_truncated_file_without_its_index():
    data = clip_bytes("h264-closed")  # moov at the end: cutting the file loses the sample index
    _expect(data[: len(data) // 2], "not a readable video")


def test_truncated_file_with_its_index_up_front(tmp_path):
    path = tmp_path / "faststart.mp4"
    _encode(str(path), "mp4", 48, options={"movflags": "faststart"})
    data = path.read_bytes()
    assert probe_video(data).num_frames == 48
    _expect(data[: len(data) * 2 // 3], "truncated")


def test_video_stream_without_frames():
    buffer = io.BytesIO()
    _encode(buffer, "matroska", 0, audio=True)
    _expect(buffer.getvalue(), "no frames")


def test_audio_only_file():
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        _add_silence(container)
    _expect(buffer.getvalue(), "no video stream.*audio")


def test_codec_nothing_can_decode():
    buffer = io.BytesIO()
    _encode(buffer, "matroska", 10)
    data = buffer.getvalue()
    assert b"V_MPEG4/ISO/AVC" in data
    _expect(data.replace(b"V_MPEG4/ISO/AVC", b"V_QQQQQ/QQQ/QQQ"), "codec.*unknown")


def test_unknown_frame_rate():
    buffer = io.BytesIO()
    _encode(buffer, "matroska", 1)
    data = buffer.getvalue()
    default_duration_id = b"\x23\xe3\x83"  # Matroska's DefaultDuration: the only place the rate is stored
    assert data.count(default_duration_id) == 1
    _expect(data.replace(default_duration_id, b"\x23\xe3\x84"), "frame rate is zero or unknown")


def test_corrupt_packets_are_reported():
    data = bytearray(clip_bytes("h264-closed"))
    # Overwrite the middle of the media data; the container's index stays intact, the packets are garbage.
    middle = len(data) // 2
    data[middle - 20000 : middle + 20000] = np.random.default_rng(3).bytes(40000)
    with pytest.raises(InvalidVideoError, match="corrupt"):
        decode_frames(bytes(data), list(range(144)))


def test_invalid_video_error_is_an_invalid_input_error():
    assert issubclass(InvalidVideoError, InvalidInputError)
