"""Load test: N concurrent streaming clients against `dsv3 serve` on loopback, bounded in time.

Starts the server itself (or uses --url), then runs `--clients` threads, each sending streaming chat requests
until `--seconds` have passed. Reports failures (must be 0), mean and p99 request latency, time to first token,
and total generated tokens/s.

    python benchmarks/load_test.py [--checkpoint runs/demo] [--clients 32] [--seconds 60] [--no-compile]
        [--threads N]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import openai


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="runs/demo")
    ap.add_argument("--url", help="an already running server (default: start one on loopback)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="the server's --compile (default: on, as `dsv3 serve`); its compile time is reported")
    ap.add_argument("--threads", type=int, default=None,
                    help="the server's --threads (default: its own, every core but one)")
    ap.add_argument("--startup-timeout", type=float, default=1200, help="seconds to wait for /health")
    args = ap.parse_args()
    proc = None
    url = args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "dsv3", "serve", args.checkpoint, "--port", str(port),
                                 "--max-batch", str(args.max_batch), "--model-name", "dsv3",
                                 "--compile" if args.compile else "--no-compile",
                                 *(["--threads", str(args.threads)] if args.threads is not None else [])])
        t0 = time.time()
        while True:  # a compiling server answers /health only once its graphs are built
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.time() - t0 > args.startup_timeout:
                    raise SystemExit(f"the server did not come up within {args.startup_timeout:.0f} s") from None
                time.sleep(0.5)
        print(f"server up after {time.time() - t0:.0f} s ({'compiled' if args.compile else 'eager'})")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=120, max_retries=0)
    model = client.models.list().data[0].id
    lock = threading.Lock()
    latencies, ttfts, failures, tokens = [], [], [], [0]
    stop_at = time.time() + args.seconds
    prompts = ["Who art thou?", "Speak of the king.", "What news from the court?", "Tell me of love."]

    def worker(i: int) -> None:
        k = 0
        while time.time() < stop_at:
            t0 = time.perf_counter()
            first = None
            n = 0
            try:
                stream = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompts[(i + k) % 4]}],
                    max_tokens=args.max_tokens, temperature=0.8, seed=i * 1000 + k, stream=True,
                    stream_options={"include_usage": False})
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        first = first or time.perf_counter() - t0
                        n += 1
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    ttfts.append(first or 0.0)
                    tokens[0] += n
            except Exception as e:  # counted, reported
                with lock:
                    failures.append(repr(e))
            k += 1

    def generated() -> int:
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            return json.loads(r.read())["generated_tokens"]

    before = generated()
    t_start = time.time()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - t_start
    total_tokens = generated() - before
    if proc is not None:
        proc.terminate()
        proc.wait(timeout=30)
    lat = sorted(latencies)
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan")
    print(f"{args.clients} streaming clients for {elapsed:.0f} s: {len(lat)} requests, {len(failures)} failures")
    if lat:
        print(f"latency mean {statistics.mean(lat):.2f} s, p99 {p99:.2f} s; time to first token mean "
              f"{statistics.mean(ttfts):.2f} s; {total_tokens / elapsed:.1f} generated tokens/s in total "
              f"({tokens[0]} streamed chunks)")
    for f in failures[:5]:
        print("  failure:", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
