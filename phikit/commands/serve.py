"""`phikit serve`: an OpenAI-compatible HTTP server (chat and text completions, streaming, batching).

`--speculate prompt-lookup` and `--draft-model M` set up speculative decoding: the server's default, which a
request's `speculate` field ("prompt-lookup", "draft-model" or "none") overrides; `--show-special` likewise
for a request's `show_special` (see app.py).

`--adapter NAME=DIR` (repeatable) loads LoRA adapters unmerged: a request whose `model` is NAME uses
that adapter, any other request the base model, and requests for different adapters are decoded in the
same batch (engine.py). --compile is refused with --adapter: the per-row adapters run eagerly only.

SIGTERM shuts down gracefully: uvicorn stops accepting connections and lets in-flight requests
finish (up to GRACE_SECONDS, then cancels them), the engine stops, and the process exits 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys

from ..cli import add_model_args, add_speculate_args, decode_fn_from, drafters_from, load_from

GRACE_SECONDS = 30  # how long in-flight requests may run on after SIGTERM


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="phikit serve",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
                    "/v1/models, /health) with streaming and continuous batching. With --adapter NAME=DIR "
                    "(repeatable), a request whose model is NAME uses that LoRA adapter, the others the base; "
                    "--compile cannot be combined with --adapter. phikit extensions of the request body: "
                    "\"speculate\": \"prompt-lookup\" | \"draft-model\" | \"none\" (speculative decoding for "
                    "that request; default --speculate) and \"show_special\": true | false (default --show-special).")
    add_model_args(p)
    add_speculate_args(p, server=True)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind; 0.0.0.0 exposes the server to the network (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    g.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="most sequences decoded together; more requests wait in a queue (default: 8)")
    g.add_argument("--max-context", type=int, default=None, metavar="N",
                   help="positions per sequence, prompt plus completion; the KV cache holds max-batch x max-context "
                        "positions (default: the model's context length, at most 4096, shrunk with a warning to what "
                        "fits in RAM next to the weights)")
    g.add_argument("--api-key", default=os.environ.get("PHIKIT_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every request (default: $PHIKIT_API_KEY, else none)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as e:
        sys.exit(f"phikit: serving needs FastAPI and uvicorn ({e.name} is missing): pip install 'phikit[serve]'")
    if args.max_batch < 1:
        sys.exit("phikit: --max-batch must be >= 1")
    if args.compile and args.adapter:
        sys.exit("phikit: --compile cannot be combined with --adapter: each batch row picks its adapter in "
                 "eager code only; drop --compile, or merge the adapter (phikit lora merge) and compile that")
    args.many_adapters = True  # several --adapter, chosen per request
    model, tokenizer = load_from(args)
    drafters = drafters_from(args, model, tokenizer, lookup=True)  # any request may ask for prompt lookup
    speculate = args.speculate or ("draft-model" if args.draft_model else "none")  # the requests' default
    speculate = None if speculate == "none" else speculate
    model_id = args.model.rstrip("/").split("/")[-1] if os.path.exists(args.model) else args.model
    adapters = list(getattr(args, "adapters", {}))
    if model_id in adapters:
        sys.exit(f"phikit: --adapter: the name {model_id!r} is the model's own id; give the adapter another NAME")
    if adapters:  # requests name the adapter they want; the others get the base
        from ..train.lora import set_active

        set_active(model, None)
    max_context = args.max_context or min(model.cfg.max_seq_len, 4096)
    if not 2 <= max_context <= model.cfg.max_seq_len:
        sys.exit(f"phikit: --max-context must be in 2..{model.cfg.max_seq_len} (the model's context length)")
    max_context = _plan_context(model, args.max_batch, max_context, args.ram_before_load,
                                explicit=args.max_context is not None)
    if not args.api_key and not _is_loopback(args.host):
        print(f"phikit: warning: serving on {args.host} without --api-key", file=sys.stderr)

    from ..serve import Engine

    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_context=max_context,
                    decode_fn=decode_fn_from(args, model), drafters=drafters)
    app = create_app(engine, model_id, api_key=args.api_key, speculate=speculate, show_special=args.show_special)
    named = f"; adapters {', '.join(adapters)}" if adapters else ""
    named += f"; speculate {speculate} by default" if speculate else ""
    print(f"phikit: serving {model_id} on http://{args.host}:{args.port}/v1 (max batch {args.max_batch}, "
          f"context {max_context}{named})", file=sys.stderr, flush=True)
    # anyio (4.16) imports its asyncio backend lazily, on the first streaming response; when that first use
    # came from many concurrent requests it once failed with "No module named 'anyio.streams'" (a 500 in the
    # 64-client load test). Loading the backend here, before any request, takes that race away.
    import anyio
    anyio.run(anyio.sleep, 0)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                           timeout_graceful_shutdown=GRACE_SECONDS, log_level="warning"))
    # uvicorn re-raises the signal that stopped it once it has shut down; a handler that ignores it
    # (in place after uvicorn restores ours) lets a graceful SIGTERM end with exit status 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    engine.close(cancel=True)
    return 0


def _plan_context(model, batch: int, max_context: int, available: int | None, explicit: bool) -> int:
    """The context the KV cache can hold next to the weights in the RAM that was available before loading:
    max_context if it fits; else a smaller one with a warning (the default context) or an exit (--max-context)."""
    from ..kv_cache import KVCache
    from ..memory import GiB, fit_context, kv_cache_bytes, model_bytes

    if available is None:
        return max_context
    budget = int(0.9 * available) - model_bytes(model)
    per_value = KVCache.bytes_per_value(model.cache_dtype, model.cfg.head_dim)
    fits = fit_context(model.cfg, batch, max_context, per_value, budget)
    if fits == max_context:
        return max_context
    need = kv_cache_bytes(model.cfg, batch, max_context, per_value)
    msg = (f"a KV cache of {batch} x {max_context} positions needs {need / GiB:.2f} GiB next to "
           f"{model_bytes(model) / GiB:.2f} GiB of weights, and {available / GiB:.2f} GiB of RAM was available")
    if explicit or fits < 64:
        sys.exit(f"phikit: {msg}; use --max-context {fits} or less, a smaller --max-batch, or --kv-cache int8"
                 if fits >= 2 else f"phikit: {msg}; not even 2 positions fit")
    print(f"phikit: warning: {msg}; serving a context of {fits} positions instead", file=sys.stderr)
    return fits


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


if __name__ == "__main__":
    sys.exit(main())
