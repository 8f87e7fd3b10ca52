"""The OpenAI-compatible server, driven by the official `openai` client and by raw HTTP for bad input.

One in-process uvicorn server (a tiny random Phi-3.5 with LongRoPE switching at 16 tokens) serves
the whole module; the engine is also driven directly where a test needs its internals (stop ids,
cancellation). Greedy server output is compared with `phikit.generate.stream_text`, the reference
loop, and with itself when batched.
"""

import http.client
import json
import queue
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import uvicorn  # noqa: E402
from tiny import tiny_config, write_checkpoint  # noqa: E402
from tiny_tokenizer import build  # noqa: E402

import phikit  # noqa: E402
from phikit.chat_format import encode_chat, stop_ids  # noqa: E402
from phikit.generate import Sampling, stream_text  # noqa: E402
from phikit.serve import Engine, Request  # noqa: E402
from phikit.serve.app import create_app  # noqa: E402
from phikit.serve.engine import SPECULATE_MAX_ROWS  # noqa: E402
from phikit.speculate import DraftModel, PromptLookup  # noqa: E402

KEY = "sk-test-key"
MAX_CONTEXT = 256
MAX_BODY = 64 * 1024


def start(app) -> tuple[uvicorn.Server, threading.Thread, int]:
    """Run app on a free loopback port in a thread; returns once it accepts connections."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    return server, thread, sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve")
    write_checkpoint(tiny_config("phi-3.5-mini-instruct"), path)
    build("phi-3.5-mini-instruct", path)
    model, tok = phikit.load(path)
    ref_model, _ = phikit.load(path)  # the reference loop gets its own copy: the engine owns `model`
    draft, _ = phikit.load(path)  # a draft that agrees often, not always: the model plus noise
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in draft.parameters():
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    drafters = {"prompt-lookup": PromptLookup(), "draft-model": DraftModel(draft)}
    engine = Engine(model, tok, max_batch=8, max_context=MAX_CONTEXT, drafters=drafters)
    server, thread, port = start(create_app(engine, "tiny-phi", api_key=KEY, max_body_bytes=MAX_BODY))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
    yield dict(engine=engine, tok=tok, ref=ref_model, port=port, client=client)
    server.should_exit = True
    thread.join(30)
    assert not engine._thread.is_alive()  # the app's shutdown closed the engine


def reference(s, ids, n, stop_strings=()):
    """Greedy text and stats from phikit's own generation loop."""
    stats = {}
    text = "".join(stream_text(s["ref"], s["tok"], ids, n, stop_ids=stop_ids(s["tok"]), stop_strings=stop_strings,
                               stats=stats))
    return text, stats


def raw(port, method, path, body=None, headers=None):
    """(status, parsed JSON body) of one plain HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                    "Authorization": f"Bearer {KEY}", **(headers or {})})
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    return r.status, json.loads(payload)


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


def test_models_and_health(served):
    assert [m.id for m in served["client"].models.list().data] == ["tiny-phi"]
    assert raw(served["port"], "GET", "/health") == (200, {"status": "ok"})


def test_chat_completion_equals_generate(served):
    r = served["client"].chat.completions.create(model="tiny-phi", messages=CHAT, max_tokens=20, temperature=0)
    want, stats = reference(served, encode_chat(CHAT, served["tok"]), 20)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == stats["finish_reason"] == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (stats["prompt_tokens"], 20)
    assert r.usage.total_tokens == stats["prompt_tokens"] + 20


def test_streaming_equals_non_streaming(served):
    client = served["client"]
    full = client.chat.completions.create(model="m", messages=CHAT, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model="m", messages=CHAT, max_tokens=24, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24  # the include_usage chunk
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"

    text = client.completions.create(model="m", prompt="The quick brown", max_tokens=30, temperature=0)
    pieces = list(client.completions.create(model="m", prompt="The quick brown", max_tokens=30, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in pieces) == text.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "length" and text.usage.completion_tokens == 30


def test_completion_crosses_longrope_switch_like_generate(served):
    """A 3-token prompt grows past original_max_seq_len (16): the row is re-prefilled as generate() does."""
    ids = served["tok"].encode("The quick", add_special_tokens=True)
    assert len(ids) < 16
    r = served["client"].completions.create(model="m", prompt="The quick", max_tokens=40, temperature=0)
    assert r.choices[0].text == reference(served, ids, 40)[0]
    assert r.usage.prompt_tokens == len(ids)


def test_stop_strings_cut_the_text_and_finish_with_stop(served):
    client, ids = served["client"], encode_chat(CHAT, served["tok"])
    full, _ = reference(served, ids, 40)
    stop = full[len(full) // 2:len(full) // 2 + 3]  # a string that occurs mid-completion
    want, stats = reference(served, ids, 40, stop_strings=[stop])
    assert stats["finish_reason"] == "stop" and len(want) < len(full)
    for stream in (False, True):
        r = client.chat.completions.create(model="m", messages=CHAT, max_tokens=40, temperature=0,
                                           stop=["never-there", stop], stream=stream)
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
            assert r.usage.completion_tokens == stats["completion_tokens"] < 40
        assert (text, finish) == (want, "stop")
    r = client.completions.create(model="m", prompt="Hello", max_tokens=40, temperature=0, stop=stop)  # a plain string
    assert stop not in r.choices[0].text


def test_stop_id_finishes_with_stop(served):
    """A stop id ends the sequence: it counts as a completion token, its text is not shown."""
    engine, tok = served["engine"], served["tok"]
    ids = tok.encode("Hello", add_special_tokens=True)
    greedy = [t for (t,) in phikit.generate(served["ref"], [ids], 12)]
    stop = greedy[4]
    first = greedy.index(stop)
    events = queue.Queue()
    engine.submit(Request(prompt=ids, max_tokens=12, emit=events.put, stop_ids=frozenset({stop})))
    text = ""
    while (e := events.get(timeout=30)).finish_reason is None:
        text += e.text
    text += e.text
    assert (e.finish_reason, e.completion_tokens) == ("stop", first + 1)
    assert text == tok.decode(greedy[:first])


def test_batching_changes_nothing(served):
    """Greedy text of each request is identical alone and among 8 concurrent requests of different lengths."""
    client, engine = served["client"], served["engine"]
    prompts = ["Hi", "The quick brown fox", "What is the capital of France? Paris is the capital.", "def add(a, b):",
               "I'M HAPPY you're here: 1234567 apples, 42 pears and 3.14159 pies; don't forget the tea!",
               "Hello, world!", "tea", "You are a helpful assistant. Answer the question briefly and clearly."]
    lengths = [48, 20, 33, 7, 40, 25, 60, 12]

    def one(i):
        r = client.completions.create(model="m", prompt=prompts[i], max_tokens=lengths[i], temperature=0)
        return r.choices[0].text, r.usage.completion_tokens

    steps = engine.steps
    alone = [one(i) for i in range(8)]
    steps_alone, steps = engine.steps - steps, engine.steps
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, range(8)))
    assert together == alone
    assert [n for _, n in alone] == lengths
    assert engine.steps - steps < steps_alone / 2  # they really shared decode steps


def test_speculating_requests_among_plain_ones(served):
    """Requests with "speculate" (prompt lookup, the draft model) decode among plain ones, concurrently: each
    gets its plain greedy text (the reference loop without speculation), streamed or not."""
    client, engine, tok = served["client"], served["engine"], served["tok"]
    prompts = ["The quick brown fox jumps over the lazy dog. The quick brown", "Hi", "def add(a, b):",
               "Hello, world! Hello, world! Hello,", "tea", "What is the capital of France?"]
    modes = ["prompt-lookup", None, "draft-model", "draft-model", "none", "prompt-lookup"]
    lengths = [40, 25, 33, 18, 30, 12]
    drafter = engine.drafters["draft-model"]
    before = drafter.accepted, drafter.drafted
    engine.speculate_max_rows = 8  # speculate with all six running (by default only while <= 2 are)

    def one(i):
        extra = {} if modes[i] is None else {"speculate": modes[i]}
        if i % 2:
            chunks = client.completions.create(model="m", prompt=prompts[i], max_tokens=lengths[i], temperature=0,
                                               stream=True, extra_body=extra)
            return "".join(c.choices[0].text for c in chunks)
        return client.completions.create(model="m", prompt=prompts[i], max_tokens=lengths[i], temperature=0,
                                         extra_body=extra).choices[0].text

    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(one, range(6)))
    for i in range(6):
        assert got[i] == reference(served, tok.encode(prompts[i], add_special_tokens=True), lengths[i])[0], i
    engine.speculate_max_rows = SPECULATE_MAX_ROWS
    accepted, drafted = drafter.accepted - before[0], drafter.drafted - before[1]
    assert 0 < accepted < drafted  # the draft model drafted, and was both right and wrong


def test_special_tokens_hidden_unless_asked(served):
    """The tiny model's greedy completion of this prompt holds a special token that is not a stop id
    (<|placeholder6|>): its text is hidden by default and shown with "show_special": true."""
    client, tok = served["client"], served["tok"]
    ids = tok.encode("The quick brown fox", add_special_tokens=True)
    greedy = [t for (t,) in phikit.generate(served["ref"], [ids], 12)]
    specials = {i for i, t in tok.backend.get_added_tokens_decoder().items() if t.special}
    assert specials & set(greedy) and not set(greedy) & stop_ids(tok)
    for show in (None, False, True):
        extra = {} if show is None else {"show_special": show}
        r = client.completions.create(model="m", prompt="The quick brown fox", max_tokens=12, temperature=0,
                                      extra_body=extra)
        assert r.choices[0].text == tok.decode(greedy, skip_special_tokens=not show)
    code, payload = raw(served["port"], "POST", "/v1/completions", {"prompt": "Hi", "speculate": "beam"})
    assert code == 400 and payload["error"]["param"] == "speculate"


def test_seeded_sampling_is_reproducible(served):
    client = served["client"]

    def sample(seed):
        return client.chat.completions.create(model="m", messages=CHAT, max_tokens=16, temperature=1.0, top_p=0.9,
                                              seed=seed, presence_penalty=0.5,
                                              frequency_penalty=0.5).choices[0].message.content
    with ThreadPoolExecutor(3) as pool:
        a, b, c = pool.map(sample, [7, 7, 8])
    assert a == b and a != c


def test_max_tokens_is_capped_by_the_context_left(served):
    prompt = [5] * (MAX_CONTEXT - 3)
    r = served["client"].completions.create(model="m", prompt=prompt, max_tokens=100, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    r = served["client"].chat.completions.create(model="m", messages=CHAT, temperature=0)  # default: all that is left
    assert r.usage.total_tokens == MAX_CONTEXT or r.choices[0].finish_reason == "stop"


LONG = "hello " * MAX_CONTEXT
BAD = [  # (body, status, what the message must name)
    (b'{"messages": [', 400, "not valid JSON"),
    (b'["a list"]', 400, "request body"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({}, 400, "missing required parameter 'messages'"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "text"),
    ({"messages": CHAT, "temperature": "hot"}, 400, "temperature"),
    ({"messages": CHAT, "temperature": 3}, 400, "temperature"),
    ({"messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": CHAT, "max_tokens": "5"}, 400, "max_tokens"),
    ({"messages": CHAT, "stream": "yes"}, 400, "stream"),
    ({"messages": CHAT, "stop": 5}, 400, "stop"),
    ({"messages": CHAT, "n": 2}, 400, "n=1"),
    ({"messages": CHAT, "logprobs": True}, 400, "logprobs"),
    ({"messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    ({"messages": [{"role": "user", "content": LONG}]}, 400, "maximum context length"),
]


@pytest.mark.parametrize("body,status,needle", BAD)
def test_malformed_chat_requests_are_clear_4xx(served, body, status, needle):
    code, payload = raw(served["port"], "POST", "/v1/chat/completions", body)
    assert code == status
    err = payload["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert needle in err["message"], err["message"]
    assert "Traceback" not in err["message"]


@pytest.mark.parametrize("body,needle", [
    ({"prompt": ["a", "b"]}, "one request per prompt"),
    ({"prompt": [1, 10**6]}, "token ids"),
    ({"prompt": LONG}, "maximum context length"),
    ({"prompt": "hi", "echo": True}, "echo"),
    ({"prompt": "hi", "best_of": 3}, "best_of"),
])
def test_malformed_completion_requests_are_clear_4xx(served, body, needle):
    code, payload = raw(served["port"], "POST", "/v1/completions", body)
    assert code == 400 and needle in payload["error"]["message"], payload


def test_context_error_is_what_openai_raises(served):
    with pytest.raises(openai.BadRequestError) as e:
        served["client"].completions.create(model="m", prompt=LONG)
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"


def test_body_size_cap_unknown_routes_and_methods(served):
    port = served["port"]
    code, payload = raw(port, "POST", "/v1/completions", {"prompt": "x" * (MAX_BODY + 1)})
    assert code == 413 and f"larger than {MAX_BODY} bytes" in payload["error"]["message"]
    chunked = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # no Content-Length: counted as it comes
    chunked.request("POST", "/v1/completions", body=iter([b'{"prompt": "', b"x" * MAX_BODY, b'"}']),
                    headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                    encode_chunked=True)
    assert chunked.getresponse().status == 413
    assert raw(port, "POST", "/v1/nothing", {})[0] == 404
    code, payload = raw(port, "GET", "/v1/chat/completions")
    assert code == 405 and "not allowed" in payload["error"]["message"]


def test_api_key_is_required(served):
    port = served["port"]
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        code, payload = raw(port, "GET", "/health", headers=headers)
        assert code == 401 and payload["error"]["code"] == "invalid_api_key"
    code, _ = raw(port, "POST", "/v1/chat/completions", b"not json", headers={"Authorization": "Bearer nope"})
    assert code == 401  # authentication comes before parsing
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()


def _wait_idle(engine, timeout=10.0):
    deadline = time.time() + timeout
    while engine.active and time.time() < deadline:
        time.sleep(0.005)
    return engine.active == 0


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_the_sequence(served, stream):
    engine, port = served["engine"], served["port"]
    body = json.dumps({"prompt": "Hi", "max_tokens": MAX_CONTEXT - 10, "temperature": 0, "stream": stream}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    steps = engine.steps
    conn.request("POST", "/v1/completions", body=body,
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    deadline = time.time() + 10
    while engine.active == 0 and time.time() < deadline:  # wait until the sequence is decoding
        time.sleep(0.001)
    if stream:
        conn.getresponse().read1(64)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert _wait_idle(engine)
    assert engine.steps - steps < MAX_CONTEXT - 20  # it stopped long before its max_tokens


def test_engine_cancel_takes_effect_before_the_next_token(served):
    engine, tok = served["engine"], served["tok"]
    got = []
    req = Request(prompt=tok.encode("Hello"), max_tokens=100, emit=lambda e: (got.append(e), len(got) == 3 and
                                                                                engine.cancel(req)))
    engine.submit(req)
    deadline = time.time() + 10
    while len(got) < 3 and time.time() < deadline:
        time.sleep(0.005)
    assert _wait_idle(engine)
    time.sleep(0.05)
    assert len(got) == 3 and all(e.finish_reason is None for e in got)  # nothing after the cancel, not even a finish


def test_engine_refuses_after_close(tmp_path):
    from phikit.serve import EngineClosed
    write_checkpoint(tiny_config("phi-3-mini-4k-instruct"), tmp_path)
    build("phi-3-mini-4k-instruct", tmp_path)
    model, tok = phikit.load(tmp_path)
    engine = Engine(model, tok, max_batch=2, max_context=32)
    events = queue.Queue()
    engine.submit(Request(prompt=[1, 2, 3], max_tokens=5, emit=events.put, sampling=Sampling(temperature=0.5)))
    engine.close()  # finishes the request in flight first
    assert [events.get_nowait() for _ in range(5)][-1].finish_reason == "length"
    with pytest.raises(EngineClosed):
        engine.submit(Request(prompt=[1], max_tokens=1, emit=events.put))
    assert model.cache_rope_long is None  # the cache is gone with the engine


def test_a_failing_request_gets_an_error_and_the_engine_goes_on(served):
    events = queue.Queue()
    served["engine"].submit(Request(prompt=[10**6], max_tokens=3, emit=events.put))  # no such embedding row
    event = events.get(timeout=30)
    assert event.finish_reason == "error" and "IndexError" in event.error
    r = served["client"].completions.create(model="m", prompt="Hello", max_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5


def test_serve_plans_the_context_that_fits(monkeypatch, capsys):
    """`phikit serve` sizes the KV cache next to the weights: the default context shrinks with a warning,
    an explicit --max-context that does not fit is refused with what would."""
    import torch

    from phikit.commands.serve import _plan_context
    from phikit.memory import kv_cache_bytes, model_bytes
    from phikit.model import Phi3

    model = Phi3(tiny_config("phi-3-mini-4k-instruct"))
    weights = model_bytes(model)
    per_position = kv_cache_bytes(model.cfg, 4, 1, 4)  # float32 cache
    available = int((weights + 100 * per_position) / 0.9) + 1  # room for 100 positions of 4 sequences
    assert _plan_context(model, 4, 64, available, explicit=False) == 64
    assert _plan_context(model, 4, 2000, available, explicit=False) == 100
    assert "serving a context of 100 positions instead" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="use --max-context 100 or less"):
        _plan_context(model, 4, 2000, available, explicit=True)
    model.kv_cache_dtype = torch.int8  # 1 byte a value plus a 4-byte scale per head_dim values, not 4 bytes
    fits = _plan_context(model, 4, 2000, available, explicit=False)
    assert abs(fits - 100 * 4 / (1 + 4 / model.cfg.head_dim)) <= 1
