"""How the data-parallel front should merge its replicas' outputs: one zmq Poller in the output thread (what
DPCoreClient does) against a reader thread per replica feeding a queue.

N producer processes stand in for engine cores: each sends a StepOutputs message (B request outputs, one token each,
engine stats) every `--step-ms`, framed by serial.py, stamped with its send time. The consumer decodes every
message, does `--work-us` of Python work per message (the output processor's detokenization stands in), and
records the delivery latency (send to processed) and its own CPU time. Both designs run the same producers.

    python scripts/dp_output_merge_bench.py --replicas 2,4,8 --out DIR     # DIR/merge.json and DIR/merge.md
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from spaceserve.core.engine_messages import CoreOutput, StepOutputs
from spaceserve.engine.serial import MessageDecoder

PRODUCER = """
import sys, time, zmq
from spaceserve.core.engine_messages import EngineCoreOutput, EngineCoreOutputs, EngineCoreStats, StepOutputs
from spaceserve.engine.serial import MessageEncoder
address, steps, batch, step_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
socket = zmq.Context().socket(zmq.PUSH)
socket.connect(address)
encoder = MessageEncoder()
time.sleep(0.3)
next_at = time.monotonic()
for step in range(steps):
    now = time.monotonic()
    outputs = [EngineCoreOutput(f"r{i}", [step % 1000], timestamps={"sent": now}) for i in range(batch)]
    socket.send_multipart(encoder.encode(StepOutputs(EngineCoreOutputs(outputs, EngineCoreStats(num_running=batch)))))
    next_at += step_s
    time.sleep(max(next_at - time.monotonic(), 0))
socket.send_multipart(encoder.encode(StepOutputs(EngineCoreOutputs([], None))))
socket.close(linger=5000)
"""


def _work(microseconds: float) -> None:
    end = time.perf_counter() + microseconds / 1e6
    while time.perf_counter() < end:
        pass


def _producers(addresses: list[str], steps: int, batch: int, step_s: float) -> list[subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return [
        subprocess.Popen([sys.executable, "-c", PRODUCER, address, str(steps), str(batch), str(step_s)], env=env)
        for address in addresses
    ]


def _bind(context: zmq.Context, count: int, directory: str, tag: str) -> tuple[list[zmq.Socket], list[str]]:
    sockets, addresses = [], []
    for index in range(count):
        socket = context.socket(zmq.PULL)
        address = f"ipc://{directory}/{tag}-{index}"
        socket.bind(address)
        sockets.append(socket)
        addresses.append(address)
    return sockets, addresses


def _record(message: StepOutputs, latencies: list[float], work_us: float) -> bool:
    outputs = message.outputs.outputs
    if not outputs:
        return False  # a producer's end
    latencies.append(time.monotonic() - outputs[0].timestamps["sent"])
    _work(work_us)
    return True


def run_poller(count: int, steps: int, batch: int, step_s: float, work_us: float, directory: str) -> dict:
    context = zmq.Context()
    sockets, addresses = _bind(context, count, directory, "poll")
    poller = zmq.Poller()
    for socket in sockets:
        poller.register(socket, zmq.POLLIN)
    decoder = MessageDecoder(CoreOutput)
    latencies: list[float] = []
    producers = _producers(addresses, steps, batch, step_s)
    cpu0, wall0, ended = time.process_time(), time.monotonic(), 0
    while ended < count:
        for socket, _ in poller.poll(500):
            while socket.poll(0, zmq.POLLIN):
                if not _record(decoder.decode(socket.recv_multipart(copy=False)), latencies, work_us):
                    ended += 1
    result = _summary("poller", count, latencies, time.process_time() - cpu0, time.monotonic() - wall0)
    for process in producers:
        process.wait()
    context.destroy(linger=0)
    return result


def run_threads(count: int, steps: int, batch: int, step_s: float, work_us: float, directory: str) -> dict:
    context = zmq.Context()
    sockets, addresses = _bind(context, count, directory, "thread")
    merged: queue.SimpleQueue = queue.SimpleQueue()

    def read(socket: zmq.Socket) -> None:
        decoder = MessageDecoder(CoreOutput)
        while True:
            message = decoder.decode(socket.recv_multipart(copy=False))
            merged.put(message)
            if not message.outputs.outputs:
                return

    readers = [threading.Thread(target=read, args=(socket,), daemon=True) for socket in sockets]
    for reader in readers:
        reader.start()
    latencies: list[float] = []
    producers = _producers(addresses, steps, batch, step_s)
    cpu0, wall0, ended = time.process_time(), time.monotonic(), 0
    while ended < count:
        if not _record(merged.get(), latencies, work_us):
            ended += 1
    result = _summary("reader threads", count, latencies, time.process_time() - cpu0, time.monotonic() - wall0)
    for process in producers:
        process.wait()
    context.destroy(linger=0)
    return result


def _summary(design: str, count: int, latencies: list[float], cpu_s: float, wall_s: float) -> dict:
    values = np.array(latencies) * 1e3
    return {
        "design": design, "replicas": count, "messages": len(latencies),
        "latency_p50_ms": float(np.percentile(values, 50)), "latency_p99_ms": float(np.percentile(values, 99)),
        "latency_max_ms": float(values.max()), "consumer_cpu_share": cpu_s / wall_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", default="2,4,8")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64, help="request outputs per message")
    parser.add_argument("--step-ms", type=float, default=5.0, help="time between one replica's messages")
    parser.add_argument("--work-us", type=float, default=200.0, help="consumer work per message")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="spaceserve-merge-") as directory:
        for count in (int(item) for item in args.replicas.split(",")):
            for run in (run_poller, run_threads):
                row = run(count, args.steps, args.batch, args.step_ms / 1e3, args.work_us, directory)
                rows.append(row)
                print(json.dumps(row))
    lines = [
        f"Merging {args.batch}-output messages sent every {args.step_ms} ms by each replica, {args.work_us} us of "
        f"consumer work per message, {args.steps} messages per replica; {os.cpu_count()} CPUs.",
        "",
        "| replicas | design | latency p50 ms | p99 ms | max ms | consumer CPU share |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['replicas']} | {row['design']} | {row['latency_p50_ms']:.3f} | {row['latency_p99_ms']:.3f} | "
            f"{row['latency_max_ms']:.2f} | {row['consumer_cpu_share']:.2f} |"
        )
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "merge.json").write_text(json.dumps(rows, indent=2))
        (out / "merge.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
