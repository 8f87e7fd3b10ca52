"""LoRA (train/lora.py) and PEFT adapter files (train/adapters.py, `phikit lora`) against PEFT itself.

Tiny random float32 models: a Phi-4-mini-shaped Phi-3 (GQA 3:1, so q, k and v have different row counts;
tied embeddings) written by transformers, and a tiny Llama (tests/test_llama.py), whose adapters use
split names that phikit fuses on load.
"""

import json

import pytest
import torch
from test_llama import llama
from tiny import VOCAB, hf_model, tiny_config, write_checkpoint
from tiny_tokenizer import build

from phikit.checkpoint import load_model
from phikit.commands.lora import main as lora_main
from phikit.quantize import QuantLinear, quantize_activations_reference, quantize_model
from phikit.train.adapters import AdapterError, adapter_base, convert_adapter, load_adapter, read_adapter, save_adapter
from phikit.train.lora import (LoRALinear, apply_lora, disabled, lora_parameters, lora_state_dict, merge_lora,
                               set_active, set_row_adapters)

PRESET = "phi-4-mini-instruct"
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    """A tiny Phi-3 checkpoint (with a tokenizer) written by transformers."""
    path = tmp_path_factory.mktemp("phi3")
    write_checkpoint(tiny_config(PRESET), path)
    build(PRESET, path)
    return path


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    llama(path, tie=False, n_kv_heads=2)
    return path


def randomize_B(params, seed=1, std=0.1):
    """Non-zero B (PEFT's init has B = 0, which would hide every mistake in the LoRA branch)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params:
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def randomize_model_B(model, seed=1, std=0.1):
    randomize_B([(n, p) for n, p in model.named_parameters() if ".lora_B." in n], seed, std)


def logits(model, ids=IDS):
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def peft_lora(hf, **kw):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(hf, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **kw)).eval()


def peft_load(hf_class, ckpt, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(hf_class.from_pretrained(ckpt).eval(), adapter_dir).eval()


def hf_module(name):
    return name if name == "lm_head" else "model." + name


# ---- the module swap ------------------------------------------------------------------------------

def test_zero_B_is_the_base_and_merge_equals_unmerged(phi3):
    """In float64, so that "equal" means the math, not float32's reassociation (~3e-6 of the logits here)."""
    model = load_model(phi3, dtype=torch.float64)
    base = logits(model)
    wrapped = apply_lora(model, "all-linear", r=4, alpha=8)
    assert len(wrapped) == 4 * model.cfg.n_layers and "lm_head" not in wrapped
    assert torch.equal(logits(model), base)  # B = 0: the adapter adds exactly nothing
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(lora_parameters(model)) == len(trainable) == 2 * len(wrapped)
    randomize_model_B(model)
    adapted = logits(model)
    assert (adapted - base).abs().max() > 0.1
    with disabled(model):
        assert torch.equal(logits(model), base)
    set_active(model, None)
    assert torch.equal(logits(model), base)
    set_active(model, "default")
    sd = lora_state_dict(model)
    assert sd["layers.0.self_attn.qkv_proj.lora_A.weight"].shape == (4, model.cfg.dim)
    merge_lora(model)
    assert type(model.layers[0].self_attn.qkv_proj) is torch.nn.Linear
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (logits(model) - adapted).abs().max() <= 1e-10


def test_the_lora_branch_computes_in_the_activation_dtype():
    """float32 adapter weights over a bf16 base: bf16 in, bf16 out, float32 gradients for A and B."""
    from phikit.bf16_linear import BF16Linear

    torch.manual_seed(0)
    base = torch.nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    base.__class__ = BF16Linear
    layer = LoRALinear.from_linear(base.requires_grad_(False), r=4, alpha=8)
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_A["default"].weight.dtype == torch.float32
    A, B = (layer.lora_A["default"].weight.bfloat16(), layer.lora_B["default"].weight.bfloat16())
    assert torch.equal(y, base(x) + (x @ A.T @ B.T) * 2.0)
    y.float().sum().backward()
    assert layer.lora_A["default"].weight.grad.dtype == torch.float32 and base.weight.grad is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x.float()).dtype == torch.bfloat16


def test_targets_and_split_names(phi3):
    model = load_model(phi3)
    assert apply_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"]) == [
        f"layers.{i}.self_attn.{p}" for i in range(model.cfg.n_layers) for p in ("qkv_proj", "o_proj")]
    assert apply_lora(model, ["qkv_proj", "lm_head"], name="second")[-1] == "lm_head"  # adds to wrapped layers
    assert set(model.layers[0].self_attn.qkv_proj.lora_A) == {"default", "second"}
    with pytest.raises(ValueError, match="part of the fused layer qkv_proj"):
        apply_lora(model, ["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="matches no linear layer"):
        apply_lora(model, ["c_attn"])
    with pytest.raises(ValueError, match="already has an adapter named 'second'"):
        apply_lora(model, ["o_proj", "qkv_proj"], name="second")
    assert "second" not in model.layers[0].self_attn.o_proj.lora_A  # refused before any layer changed


# ---- parity with PEFT -----------------------------------------------------------------------------

@pytest.mark.parametrize("rslora", [False, True])
def test_loss_and_gradients_equal_peft(phi3, rslora):
    """Same base, same adapter weights (non-zero B): phikit's loss and adapter gradients are PEFT's."""
    model = load_model(phi3)
    wrapped = apply_lora(model, "all-linear", r=4, alpha=8, rslora=rslora)
    randomize_model_B(model)
    peft = peft_lora(hf_model(tiny_config(PRESET)), r=4, lora_alpha=8, target_modules="all-linear", use_rslora=rslora)
    peft_layers = {n: peft.base_model.model.get_submodule(hf_module(n)) for n in wrapped}
    assert set(peft_layers) == set(wrapped)  # "all-linear" selects the same layers
    with torch.no_grad():
        for n, layer in peft_layers.items():
            ours = model.get_submodule(n)
            layer.lora_A["default"].weight.copy_(ours.lora_A["default"].weight)
            layer.lora_B["default"].weight.copy_(ours.lora_B["default"].weight)
            assert layer.scaling["default"] == ours.scaling["default"]

    def loss(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), IDS[:, 1:].flatten())

    ours, theirs = loss(model(IDS)), loss(peft(IDS).logits)
    ours.backward()
    theirs.backward()
    worst = 0.0
    for n, layer in peft_layers.items():
        for which in ("lora_A", "lora_B"):
            g = getattr(model.get_submodule(n), which)["default"].weight.grad
            want = getattr(layer, which)["default"].weight.grad
            worst = max(worst, ((g - want).abs().max() / want.abs().max()).item())
    print(f"\n[peft] rslora={rslora}: loss {ours.item():.6f}, |delta| {abs(ours.item() - theirs.item()):.1e}; "
          f"gradients within {worst:.1e} (relative)")
    assert abs(ours.item() - theirs.item()) <= 1e-5 and worst <= 1e-4


def test_peft_phi3_adapter_gives_peft_logits(phi3, tmp_path):
    """An adapter PEFT saved on Phi3ForCausalLM (fused names, rank and alpha patterns) loads in phikit."""
    peft = peft_lora(hf_model(tiny_config(PRESET)), r=4, lora_alpha=8, target_modules="all-linear",
                     rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 3})
    randomize_B(peft.named_parameters())
    peft.save_pretrained(tmp_path / "peft")
    model = load_model(phi3)
    load_adapter(model, tmp_path / "peft")
    assert model.layers[1].self_attn.o_proj.lora_A["default"].weight.shape[0] == 2
    assert model.layers[0].mlp.down_proj.scaling["default"] == 3 / 4
    assert (logits(model) - logits(peft)).abs().max() <= 1e-5
    with pytest.raises(AdapterError, match="already has an adapter named 'default'"):
        load_adapter(model, tmp_path / "peft")
    load_adapter(model, tmp_path / "peft", name="again")  # under another name it is a second adapter


@pytest.fixture(scope="module")
def llama_adapter(llama_ckpt, tmp_path_factory):
    """A PEFT adapter on the tiny Llama: q and v only (k gets zero rows when fused), q's alpha and v's rank
    differ (so the parts' scalings differ), and gate/up/down; with PEFT's logits."""
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama-adapter")
    peft = peft_lora(LlamaForCausalLM.from_pretrained(llama_ckpt).eval(), r=4, lora_alpha=8,
                     target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
                     rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 12})
    randomize_B(peft.named_parameters())
    peft.save_pretrained(path)
    return path, logits(peft)


def test_peft_llama_split_adapter_fuses_exactly(llama_ckpt, llama_adapter):
    path, want = llama_adapter
    model = load_model(llama_ckpt)
    load_adapter(model, path)
    qkv = model.layers[0].self_attn.qkv_proj
    assert qkv.lora_A["default"].weight.shape == (4 + 2, 64)  # q's rank + v's rank
    assert (logits(model) - want).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["phi3", "llama"])
def test_phikit_adapter_loads_in_peft(kind, phi3, llama_ckpt, tmp_path):
    from transformers import LlamaForCausalLM, Phi3ForCausalLM

    ckpt = phi3 if kind == "phi3" else llama_ckpt
    model = load_model(ckpt)
    apply_lora(model, "all-linear", r=4, alpha=8)
    apply_lora(model, ["qkv_proj", "lm_head"], r=2, alpha=4, name="other")  # not saved: another adapter
    randomize_model_B(model)
    set_active(model, "default")
    out = save_adapter(model, tmp_path / "a", base_model=str(ckpt), tokenizer=None)
    keys = read_adapter(out)[1]
    split = any(".q_proj." in k for k in keys)
    assert split == (kind == "llama") and not any("lm_head" in k for k in keys)
    assert adapter_base(out) == str(ckpt)
    peft = peft_load(Phi3ForCausalLM if kind == "phi3" else LlamaForCausalLM, ckpt, out)
    assert (logits(peft) - logits(model)).abs().max() <= 1e-5


def test_converted_adapters_give_the_same_logits(phi3, llama_ckpt, llama_adapter, tmp_path):
    from transformers import LlamaForCausalLM, Phi3ForCausalLM

    path, want = llama_adapter
    cfg = load_model(llama_ckpt).cfg
    fused = convert_adapter(path, tmp_path / "fused", "fused", cfg)
    assert any("qkv_proj" in k for k in read_adapter(fused)[1])
    model = load_model(llama_ckpt)
    load_adapter(model, fused)
    assert (logits(model) - want).abs().max() <= 1e-5
    back = convert_adapter(fused, tmp_path / "split", "split", cfg)  # recovers the q/v-only parts
    original, again = read_adapter(path)[1], read_adapter(back)[1]
    assert set(again) == set(original)
    assert (logits(peft_load(LlamaForCausalLM, llama_ckpt, back)) - want).abs().max() <= 1e-5
    # a Phi-3 adapter (fused, shared A) split and fused back is the same adapter
    model = load_model(phi3)
    apply_lora(model, "all-linear", r=4, alpha=8, rslora=True)
    randomize_model_B(model)
    fused_phi = save_adapter(model, tmp_path / "phi-fused", base_model=str(phi3))
    split_phi = convert_adapter(fused_phi, tmp_path / "phi-split", "split", model.cfg)
    again = load_model(phi3)
    load_adapter(again, split_phi)
    assert (logits(again) - logits(model)).abs().max() <= 1e-5
    refused = convert_adapter(split_phi, tmp_path / "phi-refused", "fused", model.cfg)
    for k, t in read_adapter(fused_phi)[1].items():
        assert torch.equal(read_adapter(refused)[1][k], t), k
    assert (logits(peft_load(Phi3ForCausalLM, phi3, refused)) - logits(model)).abs().max() <= 1e-5


# ---- QLoRA, row adapters ----------------------------------------------------------------------------

def test_int4_base_with_adapter_equals_the_dequantized_base_with_it(phi3, tmp_path):
    """QLoRA: int4 layers + adapter against float layers holding the dequantized weights + the same adapter.

    The reference base layers round their input as the int4 kernel does (int8 per group: the kernel's
    arithmetic, dequantize-then-matmul; test_quantize.py bounds the kernel against it by 1e-3); the adapter
    branch sees the unrounded input in both models.
    """
    model = load_model(phi3)
    apply_lora(model, "all-linear", r=4, alpha=8)
    randomize_model_B(model)
    adapter = save_adapter(model, tmp_path / "a", base_model=str(phi3))
    q = load_model(phi3)
    quantize_model(q, bits=4, group_size=32, embedding_bits=None)
    ref = load_model(phi3)
    for name, m in q.named_modules():
        if isinstance(m, QuantLinear):
            lin = ref.get_submodule(name)
            lin.weight = torch.nn.Parameter(m.dequantize())  # a new Parameter: unties lm_head from the embedding
            lin.register_forward_pre_hook(lambda mod, args, g=m.group_size: (quantize_activations_reference(
                args[0].reshape(-1, mod.in_features), g).reshape(args[0].shape),))
    without = logits(q)
    for m in (q, ref):
        load_adapter(m, adapter)
    assert isinstance(q.layers[0].self_attn.qkv_proj.base_layer, QuantLinear)
    got, want = logits(q), logits(ref)
    gap = ((got - want).abs().max() / want.abs().max()).item()
    print(f"\n[qlora] int4+adapter vs dequantized+adapter: {gap:.1e} of the logits")
    assert gap <= 1e-3 and (got - without).abs().max() > 0.1  # and the adapter does change the output


def test_row_adapters_equal_each_row_alone(phi3):
    model = load_model(phi3, dtype=torch.float64)  # float64: a batch and one row reassociate float32 sums
    for i, (name, targets) in enumerate([("a", "all-linear"), ("b", ["qkv_proj", "o_proj"]),
                                         ("c", ["down_proj", "lm_head"])]):
        apply_lora(model, targets, r=2 + i, alpha=8, name=name)
    randomize_model_B(model)
    ids = torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(2))
    names = ["a", None, "c", "b"]
    set_row_adapters(model, names)
    batch = logits(model, ids)
    for i, name in enumerate(names):
        set_active(model, name)
        alone = logits(model, ids[i:i + 1])
        assert (batch[i] - alone[0]).abs().max() <= 1e-10, name
    set_row_adapters(model, ["a", "b"])
    with pytest.raises(ValueError, match="named 2 rows, but the batch has 4"):
        logits(model, ids)
    with pytest.raises(ValueError, match="no adapter named 'd'"):
        set_row_adapters(model, ["d", None, None, None])


# ---- errors ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_adapter(phi3, tmp_path_factory):
    model = load_model(phi3)
    apply_lora(model, ["qkv_proj"], r=4, alpha=8)
    randomize_model_B(model)
    return save_adapter(model, tmp_path_factory.mktemp("good") / "a", base_model=str(phi3))


def _broken(kind, good, d):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(good, d)
    config = json.loads((d / "adapter_config.json").read_text())
    if kind == "no-config":
        (d / "adapter_config.json").unlink()
    elif kind == "ia3":
        (d / "adapter_config.json").write_text(json.dumps(config | {"peft_type": "IA3"}))
    elif kind == "dora":
        (d / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    elif kind == "shape":
        t = load_file(d / "adapter_model.safetensors")
        key = "base_model.model.model.layers.1.self_attn.qkv_proj.lora_A.weight"
        t[key] = torch.zeros(4, 40)
        save_file(t, d / "adapter_model.safetensors")
    elif kind == "pickle":
        (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    elif kind == "corrupt":
        (d / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return d


ERRORS = {"no-config": "has no adapter_config.json", "ia3": "peft_type 'IA3' is not LORA", "dora": "DoRA",
          "shape": r"layers.1.self_attn.qkv_proj.lora_A.weight has shape \(4, 40\), but the base model needs \(4, 48\)",
          "pickle": "adapter_model.bin", "corrupt": "adapter_model.safetensors is not a readable"}


@pytest.mark.parametrize("kind", list(ERRORS))
def test_bad_adapters_are_refused_in_one_line(kind, phi3, good_adapter, tmp_path):
    bad = _broken(kind, good_adapter, tmp_path / kind)
    model = load_model(phi3)
    with pytest.raises(AdapterError, match=ERRORS[kind]) as e:
        load_adapter(model, bad)
    assert "\n" not in str(e.value)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing applied
    out = str(tmp_path / "out")
    for argv in (["convert", "--adapter", str(bad), "--to", "split", "--out", out, "--base", str(phi3)],
                 ["merge", "--adapter", str(bad), "--out", out, "--model", str(phi3)]):
        with pytest.raises(SystemExit) as e:
            lora_main(argv)
        assert str(e.value.code).startswith("phikit lora: ") and "\n" not in str(e.value.code)
        assert not (tmp_path / "out").exists()


# ---- the command ----------------------------------------------------------------------------------

def test_lora_convert_and_merge_commands(phi3, tmp_path):
    model = load_model(phi3)
    apply_lora(model, "all-linear", r=4, alpha=8)
    randomize_model_B(model)
    want = logits(model)
    adapter = save_adapter(model, tmp_path / "a", base_model=str(phi3))
    assert lora_main(["convert", "--adapter", str(adapter), "--to", "split", "--out", str(tmp_path / "split")]) == 0
    split = load_model(phi3)
    load_adapter(split, tmp_path / "split")
    assert (logits(split) - want).abs().max() <= 1e-5
    assert lora_main(["merge", "--adapter", str(tmp_path / "split"), "--out", str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged")
    assert (tmp_path / "merged" / "tokenizer.json").exists()  # the base's tokenizer (the adapter has none)
    assert torch.equal(logits(merged), logits(merge_lora(model)))  # merge_lora's math, test_zero_B checks it
    assert (logits(merged) - want).abs().max() <= 1e-5 * want.abs().max()  # float32 rounding only
    with pytest.raises(SystemExit, match="already exists"):
        lora_main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged")])
