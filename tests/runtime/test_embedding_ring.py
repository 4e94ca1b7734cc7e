"""The embedding ring between the engine core and the encoder process: rows another process writes into a slot are
read back exactly, a copy-out waits on the device for its writer's event (CUDA), and nothing is left behind (the CPU ring's shared file is removed once both sides have mapped it)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from spaceserve.runtime.embedding_ring import EmbeddingRing

REPO = Path(__file__).resolve().parents[2]

# A stand-in for the encoder process: maps the ring from its handle, writes seeded random rows (two items) into a
# slot, marks it written, says so on stdout, and waits for stdin to close. On CUDA the write queues behind a long
# sleep kernel, so a copy-out issued when it reports must wait for it on the device.
WRITER = textwrap.dedent("""
    import pickle, sys, torch
    from spaceserve.runtime.embedding_ring import EmbeddingRing
    with open(sys.argv[1], "rb") as f:
        handle = pickle.load(f)
    slot, seed = int(sys.argv[2]), int(sys.argv[3])
    ring = EmbeddingRing.attach(handle)
    device = ring.buffer.device
    generator = torch.Generator(device=device).manual_seed(seed)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    if stream is not None:
        torch.cuda.set_device(device)
        with torch.cuda.stream(stream):
            torch.cuda._sleep(int(2e9))  # ~1 s on a GPU
            rows = [torch.randn(n, ring.buffer.shape[2], generator=generator, device=device).to(ring.buffer.dtype)
                    for n in (5, 9)]
            written = ring.write(slot, rows, stream)
    else:
        rows = [torch.randn(n, ring.buffer.shape[2], generator=generator).to(ring.buffer.dtype) for n in (5, 9)]
        written = ring.write(slot, rows, None)
    print(written, flush=True)
    sys.stdin.read()
""")


def _expected(seed: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.cat([torch.randn(n, width, generator=generator, device=device).to(dtype) for n in (5, 9)])


def _start_writer(ring: EmbeddingRing, tmp_path: Path, slot: int, seed: int) -> subprocess.Popen:
    handle_path = tmp_path / "ring.pickle"
    handle_path.write_bytes(pickle.dumps(ring.handle()))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(handle_path), str(slot), str(seed)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_rows_written_by_another_process_are_read_back_exactly(tmp_path):
    ring = EmbeddingRing.allocate(2, 32, 16, torch.float32, torch.device("cpu"), directory=str(tmp_path))
    ring.buffer.fill_(-7.0)
    writer = _start_writer(ring, tmp_path, slot=1, seed=3)
    try:
        assert writer.stdout.readline().strip() == "14"
        rows = ring.copy_out(1, 14, None)
        assert torch.equal(rows, _expected(3, 16, torch.float32, torch.device("cpu")))
        assert torch.all(ring.buffer[0] == -7.0) and torch.all(ring.buffer[1, 14:] == -7.0)  # nothing else touched
        ring.buffer[1].zero_()
        assert torch.equal(rows, _expected(3, 16, torch.float32, torch.device("cpu")))  # a copy of its own
    finally:
        writer.stdin.close()
        assert writer.wait(30) == 0
    files = [p for p in tmp_path.iterdir() if p.name.startswith("spaceserve-ring-")]
    assert len(files) == 1
    ring.unlink()
    ring.unlink()
    assert not any(p.name.startswith("spaceserve-ring-") for p in tmp_path.iterdir())
    assert torch.equal(ring.copy_out(1, 3, None), torch.zeros(3, 16))  # the mapping outlives the file


def test_a_batch_larger_than_a_slot_is_refused(tmp_path):
    ring = EmbeddingRing.allocate(2, 8, 4, torch.float32, torch.device("cpu"), directory=str(tmp_path))
    try:
        with pytest.raises(ValueError, match="does not fit a ring slot of 8"):
            ring.write(0, [torch.ones(5, 4), torch.ones(4, 4)], None)
        assert ring.write(0, [torch.ones(5, 4), torch.ones(3, 4)], None) == 8
    finally:
        ring.unlink()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_copy_out_right_after_the_report_waits_for_the_writer_on_the_device(tmp_path):
    """What the engine relies on: a copy-out issued as soon as the writer reports (its rows still queued behind a
    ~1 s kernel) returns those rows, not the slot's old contents, and leaves the other slot alone. On the H200
    (driver 580) a host query of the slot's interprocess event said "done" at that point, with and without MPS, so
    readiness is the device-side wait alone; this passed there both ways (commit 6d93d2a)."""
    device = torch.device("cuda", torch.cuda.current_device())
    ring = EmbeddingRing.allocate(2, 64, 1536, torch.bfloat16, device)
    ring.buffer.fill_(3.0)
    torch.cuda.synchronize()
    writer = _start_writer(ring, tmp_path, slot=1, seed=5)
    try:
        assert writer.stdout.readline().strip() == "14"
        rows = ring.copy_out(1, 14, torch.cuda.Stream(device), readers=(torch.cuda.current_stream(device),))
        assert torch.equal(rows, _expected(5, 1536, torch.bfloat16, device))
        assert bool(torch.all(ring.buffer[0] == 3.0))
    finally:
        writer.stdin.close()
        assert writer.wait(60) == 0
