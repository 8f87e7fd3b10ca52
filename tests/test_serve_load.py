"""`phikit serve` as a subprocess under load: 64 streaming clients x 10 requests with 200 malformed
requests mixed in, then a graceful SIGTERM in the middle of 16 streams."""

import http.client
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
from tiny import tiny_config, write_checkpoint  # noqa: E402
from tiny_tokenizer import build  # noqa: E402

CLIENTS, REQUESTS, MALFORMED = 64, 10, 200
MAX_CONTEXT = 512
MALFORMED_BODIES = [  # (path, body): each must come back 4xx with an OpenAI error body
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}'),
    ("/v1/chat/completions", b'{"messages": []}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "hi"}]}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "n": 3, "stream": true}'),
    ("/v1/completions", json.dumps({"prompt": "hello " * MAX_CONTEXT, "stream": True}).encode()),
    ("/v1/completions", b'{"prompt": null}'),
    ("/v1/completions", b"\xff\xfe not even utf-8"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port, path, body: bytes, method="POST"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def read_stream(response) -> tuple[str, dict]:
    """Text and final chunk of an SSE completion stream; asserts that it ends with [DONE]."""
    text, final, done = "", None, False
    for line in response:
        line = line.decode().strip()
        if not line:
            continue
        assert line.startswith("data: ") and not done, line
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            continue
        chunk = json.loads(data)
        assert "error" not in chunk, chunk
        choice = chunk["choices"][0]
        text += choice.get("text") or choice.get("delta", {}).get("content") or ""
        if choice["finish_reason"]:
            final = chunk
    assert done and final is not None
    return text, final


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("load")
    write_checkpoint(tiny_config("phi-3.5-mini-instruct"), path)
    build("phi-3.5-mini-instruct", path)
    port = free_port()
    log = open(path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "phikit", "serve", "--model", str(path), "--port", str(port),
                             "--max-batch", "16", "--max-context", str(MAX_CONTEXT), "--threads", "1"],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while True:
        try:
            if request(port, "/health", None, "GET")[1].status == 200:
                break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, log.seek(0) or log.read()
            time.sleep(0.2)
    yield proc, port
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_64_streaming_clients_with_malformed_requests_mixed_in(server):
    proc, port = server
    prompts = ["Hi", "The quick brown fox", "What is the capital of France?", "def add(a, b):"]

    def valid(i):
        rng = random.Random(i)
        greedy = rng.random() < 0.5
        n = rng.randrange(4, 24)
        prompt = rng.choice(prompts)
        if rng.random() < 0.5:
            path, body = "/v1/completions", {"prompt": prompt}
        else:
            path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}
        body.update(max_tokens=n, stream=True, temperature=0 if greedy else 0.8, seed=i)
        conn, r = request(port, path, json.dumps(body).encode())
        assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
        text, final = read_stream(r)
        conn.close()
        usage, finish = final["usage"], final["choices"][0]["finish_reason"]
        assert finish == "stop" or (finish == "length" and usage["completion_tokens"] == n)
        return (path, prompt, n) if greedy else None, text

    def malformed(i):
        path, body = MALFORMED_BODIES[i % len(MALFORMED_BODIES)]
        conn, r = request(port, path, body)
        payload = json.loads(r.read())
        conn.close()
        assert 400 <= r.status < 500 and payload["error"]["message"], (r.status, payload)
        return r.status

    def client(c):
        return [valid(c * REQUESTS + k) for k in range(REQUESTS)]

    t0 = time.time()
    with ThreadPoolExecutor(CLIENTS + 8) as pool:
        bad = [pool.submit(malformed, i) for i in range(MALFORMED)]
        good = [pool.submit(client, c) for c in range(CLIENTS)]
        results = [r for f in good for r in f.result()]
        statuses = [f.result() for f in bad]
    assert len(results) == CLIENTS * REQUESTS and len(statuses) == MALFORMED
    texts = {}
    for key, text in results:  # equal greedy requests got equal text, however the batch was composed
        if key is not None:
            assert texts.setdefault(key, text) == text
    assert request(port, "/health", None, "GET")[1].status == 200 and proc.poll() is None
    print(f"{CLIENTS * REQUESTS} streams + {MALFORMED} malformed in {time.time() - t0:.1f}s")


def test_sigterm_stops_admitting_finishes_the_streams_in_flight_and_exits_0(server):
    proc, port = server
    n = MAX_CONTEXT - 12
    body = json.dumps({"prompt": "Hi", "max_tokens": n, "temperature": 0, "stream": True}).encode()
    responses = [request(port, "/v1/completions", body)[1] for _ in range(16)]
    responses[0].readline()  # generation has started
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)  # uvicorn notices the signal within 0.1 s and closes its listening socket
    with pytest.raises(OSError):
        request(port, "/health", None, "GET")
    assert proc.poll() is None  # still running: the 16 streams (~1 s of work) are in flight
    results = [None] * 16
    threads = [threading.Thread(target=lambda i: results.__setitem__(i, read_stream(responses[i])), args=(i,))
               for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for text, final in results:
        assert final["choices"][0]["finish_reason"] == "stop" or final["usage"]["completion_tokens"] == n
    assert proc.wait(timeout=60) == 0
