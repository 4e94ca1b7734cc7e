"""Image loading, smart_resize and preprocessing, checked against transformers' PIL-based Qwen2-VL processor.

transformers 5 has two Qwen2-VL image processors: ``Qwen2VLImageProcessor`` (what AutoImageProcessor picks;
torchvision backend, not installable here) and ``Qwen2VLImageProcessorPil`` (PIL resize, numpy math). The latter
is the reference: spaceserve matches it bit for bit.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spaceserve.core.errors import InvalidInputError
from spaceserve.models.config import ImageProcessorConfig
from spaceserve.multimodal.hashing import hash_image
from spaceserve.multimodal.image import (
    load_image,
    preprocess_image,
    resize_bicubic_like_pillow,
    smart_resize,
)

transformers_qwen2_vl = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

CFG = ImageProcessorConfig()


def random_rgb(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares its size but carries no pixel data: opening works, decoding fails."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize(
    "height,width",
    [(37, 91), (300, 201), (1000, 17), (17, 1000), (13, 13), (56, 56), (480, 640), (29, 2900)],
)
def test_preprocess_matches_transformers_pil_processor(height: int, width: int) -> None:
    rng = np.random.default_rng(height * 10_000 + width)
    image = random_rgb(rng, height, width)
    reference = transformers_qwen2_vl.Qwen2VLImageProcessorPil()(images=image, return_tensors="pt")

    ours = preprocess_image(image, CFG)

    assert ours.grid_thw == tuple(reference["image_grid_thw"][0].tolist())
    assert ours.pixel_values.dtype == torch.float32
    assert ours.pixel_values.shape == reference["pixel_values"].shape
    # Bit-exact: same Pillow fixed-point resize, same float64->float32 rescale and float32 normalise.
    assert (ours.pixel_values - reference["pixel_values"]).abs().max().item() == 0.0


@pytest.mark.parametrize("min_pixels,max_pixels", [(28 * 28 * 16, 28 * 28 * 64), (28 * 28 * 100, 28 * 28 * 400)])
def test_per_request_pixel_limits_match_transformers(min_pixels: int, max_pixels: int) -> None:
    image = random_rgb(np.random.default_rng(7), 333, 517)
    # limits per call: transformers 5.17's constructor would rewrite the class-wide default for later tests
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    reference = transformers_qwen2_vl.Qwen2VLImageProcessorPil()(images=image, size=size, return_tensors="pt")

    ours = preprocess_image(image, CFG, min_pixels=min_pixels, max_pixels=max_pixels)

    assert ours.grid_thw == tuple(reference["image_grid_thw"][0].tolist())
    assert torch.equal(ours.pixel_values, reference["pixel_values"])
    assert min_pixels <= ours.grid_thw[1] * ours.grid_thw[2] * 14 * 14 <= max_pixels


def test_preprocess_counts_patches_and_tokens() -> None:
    processed = preprocess_image(random_rgb(np.random.default_rng(1), 100, 150), CFG)
    t, h, w = processed.grid_thw
    assert (t, h, w) == (1, 8, 10)  # smart_resize(100, 150) = (112, 140)
    assert processed.num_patches == 80 == processed.pixel_values.shape[0]
    assert processed.num_tokens == 20
    assert processed.pixel_values.shape[1] == 3 * 2 * 14 * 14


def test_preprocess_repeats_the_frame_over_the_temporal_patch() -> None:
    processed = preprocess_image(random_rgb(np.random.default_rng(2), 56, 56), CFG)
    per_channel = processed.pixel_values.reshape(-1, 3, 2, 14 * 14)
    assert torch.equal(per_channel[:, :, 0], per_channel[:, :, 1])


def test_preprocess_rejects_inverted_pixel_limits() -> None:
    with pytest.raises(InvalidInputError, match="min_pixels"):
        preprocess_image(random_rgb(np.random.default_rng(3), 50, 50), CFG, min_pixels=10_000, max_pixels=5_000)


@pytest.mark.parametrize(
    "size,new_size",
    [
        ((37, 91), (84, 56)),
        ((300, 201), (196, 308)),
        ((200, 100), (280, 14)),
        ((64, 64), (224, 224)),
        ((1000, 30), (140, 56)),
        ((640, 480), (644, 476)),  # Pillow 13 resizes the height first here
        ((300, 500), (280, 100)),
        ((1, 9), (3, 2)),
        ((3, 301), (28, 56)),  # Pillow 12.2 resizes images over 100x taller than wide height first
    ],
)
def test_resize_is_bit_exact_with_pillow_bicubic(size: tuple[int, int], new_size: tuple[int, int]) -> None:
    """(width, height) pairs; torch's own uint8 antialiased bicubic is off by up to 5 levels on such cases."""
    image = random_rgb(np.random.default_rng(sum(size)), size[1], size[0])
    expected = np.asarray(image.resize(new_size, Image.Resampling.BICUBIC))

    ours = resize_bicubic_like_pillow(torch.from_numpy(np.array(image)), new_size[1], new_size[0])

    assert np.array_equal(ours.numpy().astype(np.uint8), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_preprocess_equals_cpu() -> None:
    image = random_rgb(np.random.default_rng(4), 411, 733)
    on_cpu = preprocess_image(image, CFG)
    on_gpu = preprocess_image(image, CFG, device="cuda")
    assert on_gpu.pixel_values.is_cuda
    assert torch.equal(on_gpu.pixel_values.cpu(), on_cpu.pixel_values)


# ---------------------------------------------------------------- smart_resize


def test_smart_resize_matches_transformers_on_random_sizes() -> None:
    rng = np.random.default_rng(5)
    for _ in range(500):
        height, width = (int(v) for v in rng.integers(1, 5000, size=2))
        if max(height, width) / min(height, width) > 200:
            continue
        min_pixels = int(rng.integers(1, 200)) * 28 * 28
        max_pixels = min_pixels + int(rng.integers(0, 5000)) * 28 * 28
        expected = transformers_qwen2_vl.smart_resize(height, width, 28, min_pixels, max_pixels)
        assert smart_resize(height, width, 28, min_pixels, max_pixels) == expected


def test_smart_resize_rounds_half_to_even_like_python() -> None:
    # 42 / 28 = 1.5 -> 2, 70 / 28 = 2.5 -> 2 (banker's rounding, as transformers)
    assert smart_resize(42, 70, 28, 56 * 56, 28 * 28 * 1280) == (56, 56)


def test_smart_resize_rejects_extreme_aspect_ratio() -> None:
    with pytest.raises(InvalidInputError, match="aspect ratio"):
        smart_resize(10, 2010, 28, 56 * 56, 28 * 28 * 1280)
    with pytest.raises(ValueError):  # transformers raises ValueError; InvalidInputError is one
        transformers_qwen2_vl.smart_resize(10, 2010, 28, 56 * 56, 28 * 28 * 1280)


# ---------------------------------------------------------------- load_image


def test_load_image_accepts_every_input_kind(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    pixels = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    file = tmp_path / "picture.png"
    image.save(file)

    for source in (image, pixels, str(file), file, png_bytes(image), bytearray(png_bytes(image))):
        loaded = load_image(source)
        assert loaded.mode == "RGB"
        assert np.array_equal(np.asarray(loaded), pixels), type(source)


def test_load_image_converts_rgba_like_transformers() -> None:
    rgba = Image.fromarray(np.random.default_rng(8).integers(0, 256, (19, 27, 4), dtype=np.uint8), mode="RGBA")
    loaded = load_image(rgba)
    # transformers 5.17 convert_to_rgb is image.convert("RGB"): alpha dropped, colour kept.
    assert np.array_equal(np.asarray(loaded), np.asarray(rgba)[..., :3])


def test_load_image_converts_grayscale_and_palette_images() -> None:
    rng = np.random.default_rng(9)
    gray = rng.integers(0, 256, (21, 17), dtype=np.uint8)
    loaded = load_image(gray)
    assert np.array_equal(np.asarray(loaded), np.repeat(gray[..., None], 3, axis=2))

    palette_image = random_rgb(rng, 12, 12).quantize(colors=16)
    assert np.array_equal(np.asarray(load_image(palette_image)), np.asarray(palette_image.convert("RGB")))


def test_load_image_rounds_float_arrays() -> None:
    values = np.random.default_rng(10).random((9, 11, 3))
    loaded = load_image(values.astype(np.float32))
    assert np.array_equal(np.asarray(loaded), np.rint(values.astype(np.float32).astype(np.float64) * 255))


@pytest.mark.parametrize(
    "source,message",
    [
        (42, "expected a PIL image, numpy array, path or bytes, got int"),
        (b"definitely not an image", "not a recognised image format"),
        (b"", "empty"),
        ("/nonexistent/picture.png", "not found"),
        (np.ones((4, 5, 4), dtype=np.uint8), r"shape \(H, W\) or \(H, W, 3\)"),
        (np.ones((4, 5), dtype=np.int64), "dtype int64"),
        (np.full((4, 5), 1.5), r"\[0, 1\]"),
        (np.full((4, 5), np.nan), r"\[0, 1\]"),
        (np.ones((0, 5, 3), dtype=np.uint8), "zero size"),
        (Image.new("RGB", (0, 7)), "zero size"),
        (np.ones((1, 201), dtype=np.uint8), "aspect ratio"),
    ],
)
def test_load_image_errors_name_the_problem(source: object, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        load_image(source)  # type: ignore[arg-type]


def test_load_image_rejects_truncated_file() -> None:
    data = png_bytes(random_rgb(np.random.default_rng(11), 40, 40))
    with pytest.raises(InvalidInputError, match="decode"):
        load_image(data[: len(data) // 2])


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    header_only = png_header_only(width=300, height=200)
    # Within the limit, decoding is attempted and fails for lack of pixel data...
    with pytest.raises(InvalidInputError, match="decode"):
        load_image(header_only)
    # ...above it, the size error comes first, so nothing was decoded.
    with pytest.raises(InvalidInputError, match="exceeds the limit of 50000 pixels"):
        load_image(header_only, max_image_pixels=50_000)
    with pytest.raises(InvalidInputError, match="too large|exceeds"):
        load_image(png_header_only(width=60_000, height=60_000))


# ---------------------------------------------------------------- hash_image


def test_hash_image_depends_on_content_and_processing() -> None:
    rng = np.random.default_rng(12)
    pixels = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    other = pixels.copy()
    other[3, 5, 1] ^= 1

    assert hash_image(image) == hash_image(Image.fromarray(pixels.copy()))
    assert hash_image(image) != hash_image(Image.fromarray(other))
    assert hash_image(image) != hash_image(Image.fromarray(pixels.reshape(24, 16, 3)))
    assert hash_image(image, min_pixels=3136) != hash_image(image, min_pixels=6272)
    assert hash_image(image, max_pixels=10_000) != hash_image(image, min_pixels=10_000)
    assert hash_image(image, min_pixels=None) == hash_image(image)
    assert len(hash_image(image)) == 64 and int(hash_image(image), 16) >= 0
