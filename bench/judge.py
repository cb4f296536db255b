"""Benchmark of the vLLM judge's client against the local OpenAI-compatible test server.

Prints three figures:
  1. client overhead per request: the judge process's CPU time per request (request building,
     HTTP, JSON parsing, schema validation, scheduling), with image encoding subtracted, measured
     with a server that answers at once (the server runs in its own process);
  2. image encoding per request (two images at --encode-side px), reported separately;
  3. sustained concurrency: N requests in flight against a fixed service time, achieved req/s
     against the ideal in_flight / service_time, and the server-observed maximum concurrency.

    .venv/bin/python bench/judge.py [--requests 2000] [--in-flight 64] [--service-ms 50]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402

from openai_server import OpenAIServer  # noqa: E402
from pipeline.judges.base import JudgeError, make_judge  # noqa: E402
from pipeline.record import JudgeView, SubEdit  # noqa: E402
from pipeline.sources.procedural import ProceduralSource  # noqa: E402
from pipeline.judges.vllm import encode_image  # noqa: E402

MODEL = "bench-vlm"


def make_views(count: int, side: int, sub_edits: int = 3) -> list[JudgeView]:
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    background = np.ones((side, side), bool)
    subs = [SubEdit("recolor", f"make object {k} red", target=f"object {k}",
                    box=[0, 0, side // 2, side // 2]) for k in range(sub_edits)]
    return [JudgeView(id=f"b{i}", source=source, target=source, instruction=f"bench {i}",
                      sub_edits=subs, background_mask=background) for i in range(count)]


def run_batch(servers: list[OpenAIServer], views, in_flight: int, service_s: float) -> dict:
    for server in servers:
        server.script(service_time_s=service_s)
    with make_judge("vllm", url=servers[0].url, model=MODEL, max_in_flight=in_flight) as judge:
        judge.score_batch(views[: min(len(views), in_flight)])  # warm: loop, pool, connections
        for server in servers:
            server.script(service_time_s=service_s)  # reset the counters after the warm-up
        judge.stats.encode_cpu_s = judge.stats.client_cpu_s = 0.0
        cpu0, wall0 = time.process_time(), time.perf_counter()
        results = judge.score_batch(views)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        encode, loop_cpu = judge.stats.encode_cpu_s, judge.stats.client_cpu_s
        peak = judge.stats.peak_in_flight
    failed = sum(isinstance(r, JudgeError) for r in results)
    stats = [server.stats() for server in servers]
    return {"n": len(views), "wall": wall, "cpu": cpu, "encode": encode, "loop_cpu": loop_cpu,
            "failed": failed, "peak": peak, "requests": sum(s["requests"] for s in stats),
            "server_max": [s["max_concurrency"] for s in stats],
            "connections": sum(s["connections"] for s in stats)}


def main() -> int:
    parser = argparse.ArgumentParser(description="vLLM judge client benchmark")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--service-ms", type=float, default=50.0)
    parser.add_argument("--overhead-in-flight", type=int, default=16)
    parser.add_argument("--server-procs", type=int, default=1,
                        help="test-server processes sharing the port (one pure-Python server "
                             "tops out near 900 req/s)")
    parser.add_argument("--encode-side", type=int, default=512, help="image side for the encode figure")
    args = parser.parse_args()

    small = make_views(args.requests, 32)  # tiny images: these runs measure the client
    shared = args.server_procs > 1
    servers = [OpenAIServer(model=MODEL, reuse_port=shared)]
    try:
        servers += [OpenAIServer(model=MODEL, port=servers[0].port, reuse_port=True)
                    for _ in range(args.server_procs - 1)]
        o = run_batch(servers, small, args.overhead_in_flight, 0.0)
        print(f"client overhead: {(o['cpu'] - o['encode']) / o['n'] * 1e3:.3f} ms CPU/request, "
              f"process minus encoding ({o['loop_cpu'] / o['n'] * 1e3:.3f} ms on the event loop "
              f"thread; {o['n']} requests, {args.overhead_in_flight} in flight, instant server x"
              f"{len(servers)} processes, {o['n'] / o['wall']:.0f} req/s, failed {o['failed']})")

        s = run_batch(servers, small, args.in_flight, args.service_ms / 1e3)
        ideal = args.in_flight / (args.service_ms / 1e3)
        print(f"sustained: {args.in_flight} in flight x {args.service_ms:g} ms service: "
              f"{s['n'] / s['wall']:.0f} req/s (ideal {ideal:.0f}, {s['n'] / s['wall'] / ideal:.0%}); "
              f"client peak in flight {s['peak']}, server max concurrency per process "
              f"{s['server_max']} (sum {sum(s['server_max'])}), {s['connections']} connections, "
              f"client CPU {(s['cpu'] - s['encode']) / s['n'] * 1e3:.3f} ms/request "
              f"({s['loop_cpu'] / s['n'] * 1e3:.3f} on the loop), failed {s['failed']}")
    finally:
        for server in servers:
            server.stop()

    noise = make_views(1, args.encode_side)[0].source
    scene = ProceduralSource(resolution=args.encode_side).make(0, 0).source
    rounds = 20
    for label, image in (("procedural scene", scene), ("random noise", noise)):
        figures = []
        for image_format in ("png", "jpeg"):
            started = time.process_time()
            for _ in range(rounds):
                encode_image(image, 768, image_format)
                encode_image(image, 768, image_format)
            figures.append((time.process_time() - started) / rounds * 1e3)
        print(f"image encoding, 2 x {args.encode_side}px {label}: {figures[0]:.1f} ms CPU/request "
              f"as PNG, {figures[1]:.1f} ms as JPEG")
    return 0


if __name__ == "__main__":
    sys.exit(main())
