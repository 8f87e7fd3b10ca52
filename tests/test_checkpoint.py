"""Checkpoint loading and saving: HF layouts, memory mapping, hub ids offline, and every documented error."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import VOCAB, tiny_config, write_checkpoint

import phikit
from phikit.checkpoint import CheckpointError, load_model, save
from phikit.config import ConfigError

IDS = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def ckpt(tmp_path):
    """A transformers-written Phi-4-mini-shaped checkpoint (tied embeddings) and the transformers model."""
    path = tmp_path / "ckpt"
    hf = write_checkpoint(tiny_config("phi-4-mini-instruct"), path)
    return path, hf


def logits_equal(model, hf):
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), hf(IDS).logits, atol=1e-5, rtol=0)


def test_sharded_checkpoint_loads(tmp_path):
    hf = write_checkpoint(tiny_config("phi-3-mini-4k-instruct"), tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("*.safetensors"))) > 2
    logits_equal(load_model(tmp_path), hf)


@pytest.mark.parametrize("max_shard_bytes", [5 * 1024**3, 100_000])
def test_save_round_trip_and_transformers_reads_it(ckpt, tmp_path, max_shard_bytes):
    from transformers import Phi3ForCausalLM

    path, hf = ckpt
    model = load_model(path)
    out = save(model, tmp_path / "saved", max_shard_bytes=max_shard_bytes)
    assert ((out / "model.safetensors.index.json").exists()) == (max_shard_bytes < 5 * 1024**3)
    names = set()
    for f in out.glob("*.safetensors"):
        names |= set(load_file(f))
    assert "lm_head.weight" not in names  # tied, as in the official Phi-4-mini files
    logits_equal(load_model(out), hf)
    logits_equal(model, Phi3ForCausalLM.from_pretrained(out).eval())
    assert not list(tmp_path.glob(".saved.*"))  # no temporary directory left behind


def test_bf16_checkpoint_is_memory_mapped_not_copied(tmp_path):
    write_checkpoint(tiny_config("phi-3-mini-4k-instruct"), tmp_path, dtype=torch.bfloat16)
    model = load_model(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc/self/maps (Linux) to see the mapping")
    ptr = model.layers[0].mlp.down_proj.weight.data_ptr()
    file = str((tmp_path / "model.safetensors").resolve())
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi:
            assert parts[-1] == file, f"weights live in {parts[-1]!r}, not in the mapped file"
            break
    else:
        pytest.fail("weight pointer not found in any mapping")


def test_load_returns_model_and_tokenizer_and_casts(ckpt):
    path, hf = ckpt
    model, tokenizer = phikit.load(path, dtype=torch.float16)
    assert tokenizer is None  # this checkpoint has no tokenizer.json
    assert model.embed_tokens.weight.dtype == torch.float16
    assert model.lm_head.weight is model.embed_tokens.weight  # still tied after assign-loading


def test_hub_id_offline_from_the_local_cache(ckpt, tmp_path):
    """A hub id resolves through huggingface_hub's cache layout; HF_HUB_OFFLINE=1 never touches the network."""
    path, _ = ckpt
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--phikit-test--tiny"
    shutil.copytree(path, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    code = ("import phikit, sys; m, _ = phikit.load(sys.argv[1], revision=sys.argv[2] or None); "
            "print(m.cfg.n_layers)")
    for revision in ("", sha):
        out = subprocess.run([sys.executable, "-c", code, "phikit-test/tiny", revision], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == "2", out.stderr
    out = subprocess.run([sys.executable, "-c", code, "phikit-test/absent", ""], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "not in the local hub cache" in out.stderr


# ---- bad input: each gives one clear error naming what is wrong ----------------------------------

def test_truncated_safetensors(ckpt):
    path, _ = ckpt
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a readable safetensors file \(truncated"):
        load_model(path)


def test_pickle_checkpoint_is_refused_with_a_way_out(ckpt):
    path, _ = ckpt
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(CheckpointError, match="pickle weights.*arbitrary code.*save_pretrained"):
        load_model(path)


def test_shape_mismatch_names_tensor_and_file(ckpt):
    path, _ = ckpt
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.gate_up_proj.weight' in model.safetensors has "
                                              r"shape \(128, 48\), expected \(160, 48\)"):
        load_model(path)


def test_unknown_model_type(ckpt):
    path, _ = ckpt
    cfg = json.loads((path / "config.json").read_text()) | {"model_type": "gpt_neox"}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unsupported model_type 'gpt_neox'"):
        load_model(path)


def test_missing_and_unexpected_tensors(ckpt):
    path, _ = ckpt
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.o_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="tensor 'model.layers.1.self_attn.o_proj.weight' is missing"):
        load_model(path)
    tensors["model.layers.1.self_attn.o_proj.weight"] = torch.zeros(48, 48)
    tensors["model.layers.7.mlp.down_proj.weight"] = torch.zeros(48, 64)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.7.mlp.down_proj.weight' in "
                                              "model.safetensors"):
        load_model(path)


def test_index_naming_a_missing_shard(tmp_path):
    write_checkpoint(tiny_config("phi-3-mini-4k-instruct"), tmp_path, max_shard_size="100KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"lists {victim.name}, which is missing"):
        load_model(tmp_path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="no such directory"):
        load_model(tmp_path / "nope" / "deeper")


def test_weights_that_do_not_fit_are_refused_before_loading(ckpt, monkeypatch):
    """Memory planning: the size the weights will take (in the requested dtype) is checked against the
    available RAM before any tensor is read."""
    from phikit import memory

    path, _ = ckpt
    model = load_model(path, dtype=torch.float32)
    need = memory.model_bytes(model)
    assert need == sum(p.numel() * 4 for p in model.parameters())  # tied: the table once
    monkeypatch.setattr(memory, "available_bytes", lambda: int(need / 0.9) + 1)
    load_model(path, dtype=torch.float32)  # just fits
    with pytest.raises(MemoryError, match=r"needs 0\.\d\d GiB of RAM for its weights"):
        load_model(path, dtype=torch.float64)  # twice the bytes
    load_model(path, dtype=torch.float16)  # half the bytes


def test_loading_skips_random_init(ckpt):
    """The model is built on the meta device without random init: init there would import torch._dynamo
    (~70 MB resident) for values that are overwritten anyway; nn.init is left as it was."""
    path, hf = ckpt
    normal = torch.nn.init.normal_
    code = ("import sys, phikit; m, _ = phikit.load(sys.argv[1]); "
            "print('torch._dynamo' in sys.modules, m.embed_tokens.weight.abs().sum().item() > 0)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]
    logits_equal(load_model(path), hf)
    assert torch.nn.init.normal_ is normal
