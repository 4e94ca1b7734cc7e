import random

from spaceserve.kvcache.prefix_hash import block_extra_keys, extend_block_hashes, hash_block
from tests.kvcache.requests import request_with_images

BLOCK = 16


def make_request(request_id, num_tokens, images=(), seed=0):
    rng = random.Random(seed)
    return request_with_images(request_id, [rng.randrange(1, 150_000) for _ in range(num_tokens)], images)


def test_hash_is_deterministic_and_sensitive_to_every_input():
    rng = random.Random(1)
    tokens = [rng.randrange(150_000) for _ in range(BLOCK)]
    base = hash_block(None, tokens, ())
    assert base == hash_block(None, list(tokens), ())
    assert len(base) == 32
    assert hash_block(base, tokens, ()) != base
    assert hash_block(None, tokens[:-1] + [tokens[-1] + 1], ()) != base
    assert hash_block(None, tokens, ("img-a",)) != base
    assert hash_block(None, tokens, ("img-a",)) != hash_block(None, tokens, ("img-b",))
    assert hash_block(None, tokens, ("img-a", "img-b")) != hash_block(None, tokens, ("img-b", "img-a"))
    # No token/extra-key confusion: a token id as an extra key is not the same input.
    assert hash_block(None, tokens[:-1], (tokens[-1],)) != hash_block(None, tokens, ())


def test_extend_hashes_only_full_blocks_and_chains_them():
    request = make_request("r", 3 * BLOCK + 5, seed=2)
    assert extend_block_hashes(request, BLOCK) == 3
    tokens = request.all_token_ids
    expected, parent = [], None
    for i in range(3):
        parent = hash_block(parent, tokens[i * BLOCK : (i + 1) * BLOCK], ())
        expected.append(parent)
    assert request.block_hashes == expected
    assert extend_block_hashes(request, BLOCK) == 0  # idempotent


def test_extend_hashes_covers_generated_tokens():
    request = make_request("r", BLOCK + 10, seed=3)
    extend_block_hashes(request, BLOCK)
    rng = random.Random(4)
    for _ in range(5):
        request.append_output_token(rng.randrange(150_000))
    assert extend_block_hashes(request, BLOCK) == 0
    request.append_output_token(rng.randrange(150_000))
    assert extend_block_hashes(request, BLOCK) == 1
    same_prompt = make_request("s", 0)
    same_prompt.all_token_ids = list(request.all_token_ids)
    extend_block_hashes(same_prompt, BLOCK)
    assert same_prompt.block_hashes == request.block_hashes


def test_extra_keys_are_the_images_overlapping_the_range():
    request = make_request("r", 64, images=[(10, 8, "a"), (18, 20, "b"), (50, 4, "c")])
    assert block_extra_keys(request, 0, 16) == ("a",)
    assert block_extra_keys(request, 16, 32) == ("a", "b")
    assert block_extra_keys(request, 32, 48) == ("b",)
    assert block_extra_keys(request, 38, 50) == ()
    assert block_extra_keys(request, 48, 64) == ("c",)


def test_identical_tokens_different_image_differ_from_the_image_on():
    first = make_request("a", 4 * BLOCK, images=[(20, 24, "cat")], seed=5)
    second = make_request("b", 4 * BLOCK, images=[(20, 24, "dog")], seed=5)
    assert first.all_token_ids == second.all_token_ids
    extend_block_hashes(first, BLOCK)
    extend_block_hashes(second, BLOCK)
    assert first.block_hashes[0] == second.block_hashes[0]  # block 0 ends before the image
    assert all(a != b for a, b in zip(first.block_hashes[1:], second.block_hashes[1:], strict=True))
    assert len(first.block_hashes) == 4

    same_image = make_request("c", 4 * BLOCK, images=[(20, 24, "cat")], seed=5)
    extend_block_hashes(same_image, BLOCK)
    assert same_image.block_hashes == first.block_hashes
