"""Requests for the KV-cache tests: given token ids, with image placeholder spans filled with the pad token."""

from spaceserve.core import MultiModalFeature, PlaceholderRange, Request, SamplingParams

IMAGE_PAD = 151655


def request_with_images(request_id, tokens, images=()):
    """`images`: (offset, length, mm_hash) per image."""
    tokens = list(tokens)
    features = []
    for offset, length, mm_hash in images:
        tokens[offset : offset + length] = [IMAGE_PAD] * length
        features.append(
            MultiModalFeature(mm_hash, "image", PlaceholderRange(offset, length), 4 * length, (1, 2, 2 * length))
        )
    return Request(request_id, tokens, SamplingParams(), mm_features=features, arrival_time=0.0)
