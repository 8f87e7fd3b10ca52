"""GGUF files (llama.cpp, Ollama) <-> phikit: import `phi3` and `llama` models, export any model.

Reading and writing go through the `gguf` library (llama.cpp's own gguf-py). Import maps GGUF tensor
names to ours, dequantizes every tensor to the requested dtype (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
Q4_K, Q6_K are accepted), rebuilds the Config from the `<arch>.*` metadata (LongRoPE factors come
from the `rope_factors_long/short` tensors) and the tokenizer from `tokenizer.ggml.*`.

Two layout facts matter (../shared/reference/phi-family.md section 9.2):
- ggml lists dimensions innermost first, so a ggml {in, out} tensor is a torch [out, in] matrix.
- llama.cpp's converter permutes the rows of Llama's attn_q / attn_k within each head from HF's
  rotate-half order [x_0 .. x_{D/2-1} | x_{D/2} .. x_{D-1}] to the interleaved order
  [x_0, x_{D/2}, x_1, x_{D/2+1}, ...] that its non-NEOX rope expects. We undo that on import and
  redo it on export. Phi-3 uses NEOX rope in llama.cpp, so its fused attn_qkv is stored as is.

References: gguf-py (`gguf_reader.py`, `gguf_writer.py`, `quants.py`, `constants.py`); llama.cpp
`convert_hf_to_gguf.py` (`LlamaModel.permute`, `Phi3MiniModel`); transformers
`modeling_gguf_pytorch_utils.py` (reverse permutation).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from .bf16_linear import use_bf16_kernel
from .config import Config
from .memory import check_weights
from .model import Phi3

SUPPORTED_ARCHS = ("phi3", "llama")
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")


class GGUFError(ValueError):
    """A GGUF file phikit cannot use; the message names what is unsupported or broken."""


def _reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise GGUFError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as e:  # a field whose bytes are cut short
        raise GGUFError(f"GGUF metadata field {key!r} cannot be read: {e}") from None


def _permute_rows(w: torch.Tensor, n_heads: int, inverse: bool) -> torch.Tensor:
    """llama.cpp's per-head row interleave of attn_q / attn_k (inverse=True undoes it)."""
    out, rest = w.shape[0], w.shape[1:]
    half = out // n_heads // 2
    if inverse:  # GGUF rows per head: pairs (x_i, x_{i+D/2}) -> HF halves
        return w.reshape(n_heads, half, 2, *rest).transpose(1, 2).reshape(out, *rest)
    return w.reshape(n_heads, 2, half, *rest).transpose(1, 2).reshape(out, *rest)


def config_from_gguf(reader, path: Path) -> Config:
    arch = _field(reader, "general.architecture")
    if arch is None:
        raise GGUFError(f"{path} has no general.architecture metadata")
    if arch not in SUPPORTED_ARCHS:
        raise GGUFError(f"unsupported GGUF architecture {arch!r} in {path} (phikit reads: {', '.join(SUPPORTED_ARCHS)})")

    def need(key):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise GGUFError(f"{path} is missing the metadata field {arch}.{key}")
        return v

    dim, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", dim // n_heads))
    rot = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    tensors = {t.name: t for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens is not None else int(tensors["token_embd.weight"].shape[1])
    if _field(reader, f"{arch}.rope.scaling.type", "none") not in ("none", "longrope") or "rope_freqs.weight" in tensors:
        raise GGUFError(f"{path}: unsupported rope scaling ({_field(reader, f'{arch}.rope.scaling.type', 'rope_freqs')})")
    kw = dict(
        model_type=arch, vocab_size=vocab, dim=dim, n_layers=int(need("block_count")), n_heads=n_heads,
        n_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        ffn_dim=int(need("feed_forward_length")), head_dim=head_dim, rotary_frac=rot / head_dim,
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_seq_len=int(need("context_length")), tie_embeddings="output.weight" not in tensors,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        sliding_window=int(_field(reader, f"{arch}.attention.sliding_window", 0)) or None,
        torch_dtype="float32",
    )
    kw["original_max_seq_len"] = int(_field(reader, f"{arch}.rope.scaling.original_context_length", kw["max_seq_len"]))
    if "rope_factors_long.weight" in tensors:  # LongRoPE: the factor lists travel as F32 tensors
        kw["rope_long_factor"] = _tensor(tensors["rope_factors_long.weight"]).tolist()
        kw["rope_short_factor"] = _tensor(tensors["rope_factors_short.weight"]).tolist()
        attn_factor = _field(reader, f"{arch}.rope.scaling.attn_factor")
        if attn_factor is not None:
            kw["rope_short_mscale"] = kw["rope_long_mscale"] = float(attn_factor)
    return Config(**kw)


def _tensor(t) -> torch.Tensor:
    """A GGUF tensor as float32 torch, in torch's [out, in] order."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType(t.tensor_type)
    if qtype.name not in SUPPORTED_TYPES:
        raise GGUFError(f"tensor {t.name!r} has type {qtype.name}, which phikit does not read "
                        f"(supported: {', '.join(SUPPORTED_TYPES)})")
    data = np.asarray(t.data)
    if qtype.name not in ("F32", "F16"):
        data = quants.dequantize(data, qtype)  # also BF16: numpy has no bfloat16
    shape = tuple(int(x) for x in reversed(t.shape))  # ggml's innermost-first dims -> torch order
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))  # a copy: the file is read-only


def _names(cfg: Config, i: int) -> dict[str, list[str]]:
    """our parameter (layer i) -> GGUF tensors stacked along rows."""
    p, b = f"layers.{i}.", f"blk.{i}."
    fused = cfg.model_type == "phi3"
    return {
        p + "input_layernorm.weight": [b + "attn_norm.weight"],
        p + "self_attn.qkv_proj.weight": [b + "attn_qkv.weight"] if fused else
        [b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight"],
        p + "self_attn.o_proj.weight": [b + "attn_output.weight"],
        p + "post_attention_layernorm.weight": [b + "ffn_norm.weight"],
        p + "mlp.gate_up_proj.weight": [b + "ffn_up.weight"] if fused else [b + "ffn_gate.weight", b + "ffn_up.weight"],
        p + "mlp.down_proj.weight": [b + "ffn_down.weight"],
    }


def tensor_map(cfg: Config) -> dict[str, list[str]]:
    names = {"embed_tokens.weight": ["token_embd.weight"], "norm.weight": ["output_norm.weight"]}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = ["output.weight"]
    for i in range(cfg.n_layers):
        names.update(_names(cfg, i))
    return names


def load_gguf(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a GGUF file; weights are dequantized to dtype (default float32).

    The tokenizer is None when the file carries none (as for an HF directory without tokenizer.json).
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    reader = _reader(path)
    cfg = config_from_gguf(reader, path)
    dtype = dtype or torch.float32
    cfg.torch_dtype = str(dtype).removeprefix("torch.")
    tensors = {t.name: t for t in reader.tensors}
    names = tensor_map(cfg)
    wanted = {g for gs in names.values() for g in gs} | {"rope_factors_long.weight", "rope_factors_short.weight"}
    unexpected = sorted(set(tensors) - wanted)
    if unexpected:
        raise GGUFError(f"unexpected tensor {unexpected[0]!r} in {path} for a {cfg.model_type} model")
    model = Phi3.empty(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    n = sum(math.prod(s) for k, s in shapes.items() if not (cfg.tie_embeddings and k == "lm_head.weight"))
    check_weights(n * dtype.itemsize, f"{path.name} dequantized to {cfg.torch_dtype}")
    state = {}
    for ours, gguf_names in names.items():
        missing = [g for g in gguf_names if g not in tensors]
        if missing:
            raise GGUFError(f"tensor {missing[0]!r} is missing from {path}")
        parts = [_tensor(tensors[g]) for g in gguf_names]
        if cfg.model_type == "llama" and ours.endswith("qkv_proj.weight"):
            parts[0] = _permute_rows(parts[0], cfg.n_heads, inverse=True)
            parts[1] = _permute_rows(parts[1], cfg.n_kv_heads, inverse=True)
        t = parts[0] if len(parts) == 1 else torch.cat(parts)
        if tuple(t.shape) != shapes[ours]:
            raise GGUFError(f"tensor {gguf_names[0]!r} in {path} has shape {tuple(t.shape)}, expected {shapes[ours]}")
        state[ours] = t.to(dtype)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    use_bf16_kernel(model)
    has_tokenizer = _field(reader, "tokenizer.ggml.model") is not None
    return model.eval(), tokenizer_from_gguf(reader, path) if has_tokenizer else None


# ---- tokenizer: tokenizer.ggml.* <-> tokenizers.Tokenizer -----------------------------------------
# token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# pre-tokenizer regexes by llama.cpp's `tokenizer.ggml.pre` name; anything else gets GPT-2's
_O200K = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_REGEXES = {"gpt-4o": _O200K, "llama-bpe": _LLAMA3, "llama3": _LLAMA3}


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges for a SentencePiece vocabulary that ships scores but no merges.

    SentencePiece-BPE merges the pair whose joined piece has the highest score. Every way of
    splitting a piece into two pieces of the vocabulary is a merge; ranking them by the joined
    piece's score (then the longer left part first) recovers SentencePiece's order.
    """
    index = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores):
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in index and right in index:
                merges.append((-score, -len(left), index[left], index[right], left, right))
    merges.sort()
    return [(m[4], m[5]) for m in merges]


def tokenizer_from_gguf(reader, path: Path):
    """The phikit Tokenizer described by a GGUF file's tokenizer.ggml.* metadata."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    from .tokenizer import Tokenizer

    kind = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise GGUFError(f"{path} has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    types = _field(reader, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    arch = _field(reader, "general.architecture")

    def token(key):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":  # byte-level BPE (SmolLM2, Phi-4-mini)
        merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges") or []]
        backend = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
        pre = _field(reader, "tokenizer.ggml.pre", "default")
        if pre in SPLIT_REGEXES:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(SPLIT_REGEXES[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        elif pre == "smollm":  # digits one by one, then GPT-2's split
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
        else:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        add_bos_default = False
    elif kind == "llama":  # SentencePiece BPE with byte fallback (Llama-2, Phi-3)
        merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges") or []]
        if not merges:
            scores = _field(reader, "tokenizer.ggml.scores")
            if scores is None:
                raise GGUFError(f"{path}: a 'llama' tokenizer needs tokenizer.ggml.scores or merges")
            merges = _spm_merges(tokens, scores)
        backend = HFTokenizer(models.BPE(vocab, merges, unk_token=token("unknown"), fuse_unk=True, byte_fallback=True))
        if arch == "phi3":  # Phi-3's own tokenizer.json: a leading space added to every text segment
            backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        else:
            backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
        add_bos_default = True
    else:
        raise GGUFError(f"unsupported GGUF tokenizer model {kind!r} in {path} (phikit reads: gpt2, llama)")

    # llama.cpp strips the whitespace after Phi-3's special tokens (the rstrip flags of Phi-3's own
    # tokenizer.json), keyed on the model *name*, since GGUF has no field for it (llama-vocab.cpp)
    name = str(_field(reader, "general.name", "")).lower()
    rstrip = ("phi-3" in name or "phi3" in name)
    keep_space = {"<unk>", "<s>", "<|endoftext|>"}
    backend.add_tokens([AddedToken(t, normalized=False, special=ty == CONTROL, rstrip=rstrip and t not in keep_space)
                        for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)])
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    bos, eos = token("bos"), token("eos")
    single = ([f"{bos}:0"] if add_bos and bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos and eos else [])
    specials = [(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on and t]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=single + ["$B:1"], special_tokens=specials)
    config = {"bos_token": bos, "eos_token": eos, "unk_token": token("unknown"), "pad_token": token("padding"),
              "add_bos_token": add_bos, "chat_template": _field(reader, "tokenizer.chat_template")}
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    return Tokenizer.from_parts(backend, config, [i for i in (_field(reader, "tokenizer.ggml.eos_token_id"), eot)
                                                  if i is not None])


# ---- export ---------------------------------------------------------------------------------------
EXPORT_TYPES = ("f16", "q8_0", "q4_0", "q4_1")


def _gguf_vocab(tokenizer, cfg: Config) -> dict:
    """tokenizer.ggml.* fields for our tokenizer: tokens, types, scores or merges, pre-tokenizer name."""
    import json

    spec = json.loads(tokenizer.backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise GGUFError(f"cannot export a {model.get('type')} tokenizer to GGUF (phikit writes BPE tokenizers)")
    n = max(cfg.vocab_size, tokenizer.vocab_size)
    tokens = [tokenizer.id_to_token(i) or f"[PAD{i}]" for i in range(n)]
    types = [NORMAL if tokenizer.id_to_token(i) is not None else UNUSED for i in range(n)]
    for t in spec["added_tokens"]:
        types[t["id"]] = CONTROL if t["special"] else USER_DEFINED
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    out = {"tokens": tokens, "types": types, "merges": merges}
    if model.get("byte_fallback"):  # SentencePiece style: llama.cpp merges by piece score
        out["model"], out["pre"] = "llama", "default"
        rank = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", "", 1), r)
        out["scores"] = [float(-rank[t]) if t in rank else -1e6 - i for i, t in enumerate(tokens)]
        for i, t in enumerate(tokens):
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types[i] = BYTE
            elif t == model.get("unk_token"):
                types[i] = UNKNOWN
        normalizer, pre = json.dumps(spec.get("normalizer")), json.dumps(spec.get("pre_tokenizer"))
        out["add_space_prefix"] = '"Prepend"' in normalizer or ('"Metaspace"' in pre and '"never"' not in pre)
    else:  # byte-level BPE: name the pre-tokenizer's split rule as llama.cpp knows it
        out["model"] = "gpt2"
        pre = spec.get("pre_tokenizer") or {}
        steps = pre.get("pretokenizers", [pre])
        regex = next((s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"), None)
        by_regex = {v: k for k, v in SPLIT_REGEXES.items() if k != "llama3"}
        if regex is not None and regex in by_regex:
            out["pre"] = by_regex[regex]
        elif [s.get("type") for s in steps] == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
            out["pre"] = "smollm"
        elif [s.get("type") for s in steps] == ["ByteLevel"] and steps[0].get("use_regex", True):
            out["pre"] = "gpt-2"
        else:
            raise GGUFError("the tokenizer's pre-tokenizer has no llama.cpp name (phikit knows: o200k / gpt-4o, "
                            "llama3, smollm, gpt-2)")
    return out


def save_gguf(model: Phi3, tokenizer, path: str | os.PathLike, qtype: str = "f16") -> Path:
    """Write model and tokenizer as a GGUF file llama.cpp runs; 2-D weights in `qtype` (f16, q8_0, q4_0, q4_1)."""
    import gguf

    if qtype not in EXPORT_TYPES:
        raise GGUFError(f"unsupported export type {qtype!r} (choose: {', '.join(EXPORT_TYPES)})")
    cfg, path = model.cfg, Path(path)
    if cfg.longrope and cfg.rope_mscale(True) != cfg.rope_mscale(False):
        raise GGUFError("GGUF has one LongRoPE attention factor; this config has different short/long mscales")
    arch = cfg.model_type
    w = gguf.GGUFWriter(str(path) + ".tmp", arch)  # written aside, renamed when complete
    w.add_type("model")
    # llama.cpp keys Phi-3's special-token whitespace rule on the name (see tokenizer_from_gguf)
    phi3_spm = arch == "phi3" and tokenizer is not None and tokenizer.token_to_id("<0x0A>") is not None
    w.add_name(path.stem if not phi3_spm or "phi-3" in path.stem.lower() else f"phi-3 {path.stem}")
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_block_count(cfg.n_layers)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.rotary_dim)
    if cfg.head_dim != cfg.dim // cfg.n_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(cfg.original_max_seq_len)
        w.add_sliding_window(cfg.sliding_window or 0)
        if cfg.longrope:
            w.add_rope_scaling_attn_factors(cfg.rope_mscale(True))
    else:
        w.add_vocab_size(cfg.vocab_size)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[qtype]
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    if tokenizer is not None:
        v = _gguf_vocab(tokenizer, cfg)
        w.add_tokenizer_model(v["model"])
        w.add_tokenizer_pre(v["pre"])
        w.add_token_list(v["tokens"])
        w.add_token_types(v["types"])
        if "scores" in v:
            w.add_token_scores(v["scores"])
            w.add_add_space_prefix(v["add_space_prefix"])
        if v["merges"]:
            w.add_token_merges(v["merges"])
        for key, tok in (("bos", tokenizer.bos_token), ("eos", tokenizer.eos_token), ("unk", tokenizer.unk_token),
                         ("pad", tokenizer.pad_token)):
            if tok is not None and tokenizer.token_to_id(tok) is not None:
                getattr(w, f"add_{key}_token_id")(tokenizer.token_to_id(tok))
        for marker in ("<|end|>", "<|im_end|>", "<|eot_id|>"):  # the chat turn's end: llama.cpp's EOT
            if tokenizer.token_to_id(marker) is not None:
                w.add_eot_token_id(tokenizer.token_to_id(marker))
                break
        probe = tokenizer.encode("a", add_special_tokens=True)
        w.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_id)
        w.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_id and len(probe) > 1)
        from .chat_format import family_template, guess_family

        w.add_chat_template(tokenizer.chat_template or family_template(guess_family(tokenizer)))

    state = model.state_dict()
    for ours, names in tensor_map(cfg).items():
        t = state[ours].detach().float()
        rows = [t.shape[0] // len(names)] * len(names)
        if cfg.model_type == "llama" and ours.endswith("qkv_proj.weight"):
            rows = [cfg.n_heads * cfg.head_dim] + [cfg.n_kv_heads * cfg.head_dim] * 2
        parts = list(t.split(rows)) if len(names) > 1 else [t]
        if cfg.model_type == "llama" and ours.endswith("qkv_proj.weight"):
            parts[0] = _permute_rows(parts[0], cfg.n_heads, inverse=False)
            parts[1] = _permute_rows(parts[1], cfg.n_kv_heads, inverse=False)
        for name, part in zip(names, parts):
            _add_tensor(w, name, part.contiguous().numpy(), qtype)
    if cfg.longrope:
        w.add_tensor("rope_factors_long.weight", np.asarray(cfg.rope_long_factor, dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.asarray(cfg.rope_short_factor, dtype=np.float32))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=True)
    finally:
        w.close()
    os.replace(str(path) + ".tmp", path)
    return path


def _add_tensor(w, name: str, data: np.ndarray, qtype: str) -> None:
    """1-D tensors (norms) stay F32; matrices become qtype, or F16 where a row does not fill whole blocks."""
    from gguf import GGMLQuantizationType, quants

    if data.ndim == 1:
        w.add_tensor(name, data.astype(np.float32))
        return
    if qtype != "f16":
        q = GGMLQuantizationType[qtype.upper()]
        try:
            w.add_tensor(name, quants.quantize(data, q), raw_dtype=q)
            return
        except quants.QuantError:
            pass  # row length not a multiple of the block size (32)
    w.add_tensor(name, data.astype(np.float16))
