"""Checkpoints: Hugging Face safetensors directories (single file or sharded) <-> Phi3.

Our on-disk format *is* the HF layout (config.json, model.safetensors or shards plus
model.safetensors.index.json, tokenizer files), so a directory saved here loads in transformers
and vice versa. Converting names is a prefix strip: HF `model.layers.0.mlp.down_proj.weight` is our
`layers.0.mlp.down_proj.weight`; `lm_head.weight` keeps its name and is absent when embeddings are
tied. Llama checkpoints (`LlamaForCausalLM`) load into the same model: their separate q/k/v and
gate/up tensors are fused on load and split on save (`hf_parts`).

Loading builds the model on the meta device and assigns tensors straight from the memory-mapped
files, cast only when the requested dtype differs, so a bf16 checkpoint is never copied to fp32.
Pickle files (.bin/.pt/.pth) are refused: unpickling can run arbitrary code.

References: gpt-fast `generate.py::_load_model`; safetensors docs (`safe_open`); transformers
`modeling_utils.py` sharded loading (`model.safetensors.index.json` with a `weight_map`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .bf16_linear import use_bf16_kernel
from .config import Config
from .memory import check_weights
from .model import Phi3

HF_PREFIX = "model."
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# tensors some checkpoints carry that are derived, not learned: skipped on load
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the tensor."""


def ours_to_hf(name: str) -> str:
    return name if name.startswith("lm_head.") else HF_PREFIX + name


def hf_parts(cfg: Config, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """The HF tensors (name, shape) that hold our parameter `name`, stacked along dim 0 in this order.

    Phi-3 checkpoints store qkv_proj and gate_up_proj fused, as we do: one tensor each. Llama
    checkpoints store q/k/v and gate/up apart; we fuse them on load (rows [q | k | v] and
    [gate | up], the order Phi-3's fused tensors use) and split them again on save. HF's Llama
    q/k rows are already in the rotate-half layout, so no permutation is needed.
    """
    hf = ours_to_hf(name)
    if cfg.model_type == "llama":
        if name.endswith("self_attn.qkv_proj.weight"):
            rows = [cfg.n_heads * cfg.head_dim] + [cfg.n_kv_heads * cfg.head_dim] * 2
            return [(hf.replace("qkv_proj", f"{p}_proj"), (r, shape[1])) for p, r in zip("qkv", rows)]
        if name.endswith("mlp.gate_up_proj.weight"):
            return [(hf.replace("gate_up_proj", f"{p}_proj"), (cfg.ffn_dim, shape[1])) for p in ("gate", "up")]
    return [(hf, shape)]


def resolve(path_or_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local checkpoint directory, downloading a hub repo id through huggingface_hub if needed.

    huggingface_hub honours HF_HUB_OFFLINE=1 (use the local cache only) and HF_HOME.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    if str(path_or_id).count("/") != 1 or str(path_or_id).startswith((".", "/", "~")):
        raise CheckpointError(f"{path_or_id}: no such directory, and not a hub repo id of the form 'owner/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(path_or_id), revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(f"{path_or_id} is not in the local hub cache and cannot be downloaded "
                              f"(offline or HF_HUB_OFFLINE=1): {e}") from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"could not download {path_or_id} (revision {revision or 'main'}): {e}") from None


def _weight_files(ckpt: Path) -> dict[str, Path]:
    """tensor name -> file, from the shard index or from the safetensors file(s) themselves."""
    index = ckpt / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid shard index (needs a 'weight_map'): {e}") from None
        files = {name: ckpt / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.exists():
                raise CheckpointError(f"{index} lists {f.name}, which is missing from {ckpt}")
        return files
    shards = sorted(ckpt.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in ckpt.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{ckpt} holds only pickle weights ({', '.join(pickles)}); phikit loads safetensors only, because "
                "unpickling a file can run arbitrary code. Convert once with transformers: "
                "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT_DIR, safe_serialization=True)")
        raise CheckpointError(f"no *.safetensors weights in {ckpt}")
    files = {}
    for f in shards:
        for name in _open(f).keys():
            files[name] = f
    return files


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "U8": torch.uint8, "I8": torch.int8,
           "I32": torch.int32, "I64": torch.int64}


def copying_reader(files: dict[str, Path]):
    """read(name) -> tensor copied from its file into fresh memory, not memory-mapped.

    For streaming a checkpoint (`phikit quantize`): the bytes read leave no resident file pages behind.
    """
    headers = {}

    def read(name: str) -> torch.Tensor:
        f = files[name]
        if f not in headers:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                headers[f] = (8 + n, json.loads(fh.read(n)))
        base, meta = headers[f]
        info = meta[name]
        start, end = info["data_offsets"]
        buf = torch.empty(end - start, dtype=torch.uint8)
        with open(f, "rb") as fh:
            fh.seek(base + start)
            if fh.readinto(buf.numpy()) != end - start:
                raise CheckpointError(f"{f} is truncated at tensor {name!r}")
        return buf.view(_DTYPES[info["dtype"]]).reshape(info["shape"])

    return read


def _open(f: Path):
    try:
        return safe_open(str(f), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{f} is not a readable safetensors file (truncated or corrupt?): {e}") from None


QUANT_SCALES = ("scales", "mins")  # quantized layers' scale tensors: exactly the stored dtype, never cast


def _loaded_bytes(meta_state: dict, cfg: Config, dtype: torch.dtype | None, tied: bool) -> int:
    """What the weights will take in memory: float weights in dtype (default the checkpoint's), codes and
    scales as stored; a tied lm_head shares the embedding."""
    float_size = (dtype or getattr(torch, cfg.torch_dtype, torch.bfloat16)).itemsize
    return sum(t.numel() * (float_size if t.is_floating_point() and not name.endswith(QUANT_SCALES) else t.element_size())
               for name, t in meta_state.items() if not (tied and name == "lm_head.weight"))


def load_model(ckpt: str | os.PathLike, dtype: torch.dtype | None = None, revision: str | None = None) -> Phi3:
    """Build a Phi3 from a checkpoint directory or hub id, on the CPU, in `dtype` (default: the checkpoint's)."""
    ckpt = resolve(ckpt, revision)
    if not (ckpt / "config.json").exists():
        raise CheckpointError(f"{ckpt} has no config.json")
    cfg = Config.from_file(ckpt / "config.json")
    files = _weight_files(ckpt)
    model = Phi3.empty(cfg)
    with torch.device("meta"):
        if cfg.quantization is not None:  # rebuild the quantized structure, then load its buffers
            from .quantize import FORMAT, quantize_model

            q = cfg.quantization
            if q.get("format") != FORMAT:
                raise CheckpointError(f"{ckpt} was quantized in format {q.get('format')!r}; this phikit reads "
                                      f"{FORMAT!r}: quantize the float checkpoint again with `phikit quantize`")
            quantize_model(model, q["bits"], q["group_size"], q.get("symmetric", False), tuple(q.get("keep_8bit", ())),
                           q.get("embedding_bits", 8))
            cfg.quantization["calibrated"] = bool(q.get("calibrated", False))  # how the codes were chosen: kept
    meta_state = model.state_dict()
    params = {k: tuple(v.shape) for k, v in meta_state.items()}
    tied = cfg.tie_embeddings and "lm_head.weight" in params  # a quantized model unties its lm_head
    if tied:
        del params["lm_head.weight"]  # tied: the file has no lm_head, logits use embed_tokens
    parts = {name: hf_parts(cfg, name, shape) for name, shape in params.items()}
    expected = {hf_name for p in parts.values() for hf_name, _ in p}
    for name, f in files.items():
        if name not in expected and not name.endswith(_IGNORED_SUFFIXES):
            raise CheckpointError(f"unexpected tensor {name!r} in {f.name} (not part of a {cfg.n_layers}-layer "
                                  f"{cfg.model_type} model with this config.json)")
    missing = sorted(expected - set(files))
    if missing:
        raise CheckpointError(f"tensor {missing[0]!r} is missing from {ckpt}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    check_weights(_loaded_bytes(meta_state, cfg, dtype, tied), f"{ckpt.name} ({cfg.n_layers} layers)")

    state: dict[str, torch.Tensor] = {}
    handles = {}
    for ours, hf_tensors in parts.items():
        pieces = []
        for name, shape in hf_tensors:
            f = files[name]
            if f not in handles:
                handles[f] = _open(f)  # also validates the file (header, size) before anything is read
            try:
                t = handles[f].get_tensor(name)  # memory-mapped: pages become resident as they are read
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"cannot read tensor {name!r} from {f.name}: {e}") from None
            if tuple(t.shape) != shape:
                raise CheckpointError(f"tensor {name!r} in {f.name} has shape {tuple(t.shape)}, expected {shape} "
                                      f"for this config.json")
            want = meta_state[ours].dtype
            exact = not want.is_floating_point or ours.endswith(QUANT_SCALES)
            if t.is_floating_point() != want.is_floating_point or (exact and t.dtype != want):
                raise CheckpointError(f"tensor {name!r} in {f.name} has dtype {t.dtype}, expected "
                                      f"{'a float type' if want.is_floating_point else want}")
            pieces.append(t)
        t = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        # quantized codes and their scales keep their dtype; only plain float weights are cast
        cast = dtype is not None and t.is_floating_point() and not ours.endswith(QUANT_SCALES)
        state[ours] = t.to(dtype) if cast and t.dtype != dtype else t
    if tied:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if tied:
        model.lm_head.weight = model.embed_tokens.weight  # assign=True replaced the shared Parameter: re-tie
    use_bf16_kernel(model)  # bf16 decoding through phikit's kernel (phikit/bf16_linear.py)
    return model.eval()


def save(model: Phi3, out_dir: str | os.PathLike, tokenizer=None, max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write config.json and safetensors weights (sharded with an index beyond max_shard_bytes), HF names.

    Files are written to a temporary directory next to out_dir and moved into place, so an
    interrupted save never leaves a half-written checkpoint behind. Tokenizer and generation files
    are written by `tokenizer.save` (a phikit Tokenizer) when one is given.
    """
    out = Path(out_dir)
    cfg = model.cfg
    from .quantize import FORMAT

    if cfg.quantization is not None and cfg.quantization.get("format") != FORMAT:
        raise CheckpointError(f"this model's quantized layers ({cfg.quantization.get('format')} format: GGUF tensors "
                              "kept as they are, of mixed kinds) have no phikit checkpoint format: load the GGUF with "
                              "dtype=torch.float32 (--dtype float32) and quantize that, or convert it --to gguf")
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings and cfg.quantization is None:
            continue  # tied: written once, as embed_tokens
        pieces = hf_parts(cfg, name, tuple(t.shape))
        rows = [shape[0] for _, shape in pieces]
        for (hf_name, _), piece in zip(pieces, t.detach().split(rows)):
            tensors[hf_name] = piece.contiguous()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    with replaced_dir(out) as tmp:
        hf = cfg.to_hf()
        hf["torch_dtype"] = str(model.norm.weight.dtype).removeprefix("torch.")  # norms are never quantized
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({name: fname for name in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return out


@contextlib.contextmanager
def replaced_dir(out: Path):
    """Yield a fresh temporary directory next to out; when the block completes it replaces out (an earlier
    out is removed only then), and when it fails it is removed: an interrupted write leaves out as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
