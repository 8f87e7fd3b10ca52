"""Serving benchmark: N concurrent streaming clients against `phikit serve` on loopback.

Starts `phikit serve` as a subprocess (the demo model, SmolLM2-135M-Instruct, unless --model is
given), then for each client count runs that many threads, each sending --requests streamed chat
completions one after another (temperature 0.7, run to max_tokens with ignore_eos as vLLM's
benchmark does, so every request has the same length). Reports requests/s, aggregate completion
tokens/s (and its ratio to one client), and time to first token p50/p99; any failed request makes
the exit status 1.

    python bench/serve.py                      # 1, 8 and 32 clients, table on stdout
    python bench/serve.py --clients 1,8 --json

The interesting number is the ratio: a decode step reads every weight once for the whole batch,
so on a memory-bound CPU eight clients should get several times one client's tokens/s.
References: vLLM `benchmarks/benchmark_serving.py`, llama.cpp `tools/server/bench`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain in two sentences why the sky is blue.", "Give three tips for learning a new language.",
           "What is 17 times 23? Show your work.", "Describe a cat to someone who has never seen one.",
           "List the planets of the solar system in order.", "Summarize the plot of Romeo and Juliet."]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark `phikit serve` with concurrent streaming clients.")
    p.add_argument("--model", default=None, help="model for phikit serve (default: the SmolLM2 demo model)")
    p.add_argument("--clients", default="1,8,32", help="comma-separated client counts (default: 1,8,32)")
    p.add_argument("--requests", type=int, default=3, help="requests per client, sent one after another (default: 3)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default: 64)")
    p.add_argument("--max-context", type=int, default=512, help="server --max-context (default: 512)")
    p.add_argument("--dtype", default="bfloat16", help="server --dtype (default: bfloat16, the usual serving dtype)")
    p.add_argument("--threads", type=int, default=None, help="server --threads (default: PyTorch's choice)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    return p.parse_args(argv)


def stream_one(port: int, prompt: str, max_tokens: int, seed: int) -> dict:
    """One streamed chat completion: time to first token, total time, completion tokens, success."""
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": 0.7, "seed": seed, "stream": True, "ignore_eos": True})
    t0 = time.perf_counter()
    ttft, tokens, done = None, 0, False
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            return {"ok": False, "error": f"HTTP {r.status}"}
        for line in r:
            data = line.decode().strip().removeprefix("data: ")
            if not data:
                continue
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return {"ok": False, "error": chunk["error"]["message"]}
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        conn.close()
    except OSError as e:
        return {"ok": False, "error": repr(e)}
    return {"ok": done, "ttft": ttft if ttft is not None else time.perf_counter() - t0,
            "time": time.perf_counter() - t0, "tokens": tokens}


def run_level(port: int, clients: int, requests: int, max_tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client(c: int):
        for k in range(requests):
            res = stream_one(port, PROMPTS[(c + k) % len(PROMPTS)], max_tokens, seed=c * requests + k)
            with lock:
                results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    ttfts = sorted(r["ttft"] for r in ok)
    return {"clients": clients, "requests": len(results), "failed": len(results) - len(ok),
            "wall_s": wall, "req_per_s": len(ok) / wall, "tok_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
            "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else None,
            "errors": sorted({r["error"] for r in results if not r["ok"]})[:3]}


def start_server(args, max_batch: int) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "phikit", "serve", "--port", str(port), "--max-batch", str(max_batch),
           "--max-context", str(args.max_context), "--dtype", args.dtype]
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"bench: the server exited with status {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("bench: the server did not come up within 300 s")


def main(argv=None) -> int:
    args = parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    proc, port = start_server(args, max_batch=max(levels))
    try:
        stream_one(port, PROMPTS[0], 8, seed=0)  # warm-up: first-call allocations, thread pools
        rows = [run_level(port, n, args.requests, args.max_tokens) for n in levels]
    finally:
        proc.terminate()
        proc.wait(60)
    base = next((r["tok_per_s"] for r in rows if r["clients"] == 1), None)
    for r in rows:
        r["tok_per_s_vs_1"] = r["tok_per_s"] / base if base else None
    if args.json:
        print(json.dumps({"model": args.model or "SmolLM2-135M-Instruct (demo)", "dtype": args.dtype,
                          "threads": args.threads, "cpu_count": os.cpu_count(),
                          "max_tokens": args.max_tokens, "results": rows}, indent=2))
    else:
        print("| clients | requests | failed | req/s | tokens/s | vs 1 client | TTFT p50 | TTFT p99 |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            ratio = f"{r['tok_per_s_vs_1']:.1f}x" if r["tok_per_s_vs_1"] else "-"
            p50 = f"{r['ttft_p50_s'] * 1000:.0f} ms" if r["ttft_p50_s"] is not None else "-"
            p99 = f"{r['ttft_p99_s'] * 1000:.0f} ms" if r["ttft_p99_s"] is not None else "-"
            print(f"| {r['clients']} | {r['requests']} | {r['failed']} | {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} "
                  f"| {ratio} | {p50} | {p99} |")
        for r in rows:
            for e in r["errors"]:
                print(f"error at {r['clients']} clients: {e}", file=sys.stderr)
    return 1 if any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
