"""Llama checkpoints load into the same model (q/k/v and gate/up fused at load) and match transformers."""

import pytest
import torch
from tiny import VOCAB

from phikit.checkpoint import load_model, save
from phikit.config import Config


def llama(tmp_path, tie: bool, n_kv_heads: int = 2, seed: int = 0, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=n_kv_heads, rope_theta=100000.0,
                      max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=tie, **extra)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.eval().save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("tie, n_kv_heads", [(False, 2), (True, 1), (False, 4)])
def test_llama_logits_match_transformers(tmp_path, tie, n_kv_heads):
    hf = llama(tmp_path, tie, n_kv_heads)
    model = load_model(tmp_path)
    assert model.cfg.model_type == "llama" and model.cfg.n_kv_heads == n_kv_heads
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        delta = (model(ids) - hf(ids).logits).abs().max().item()
    print(f"\n[parity] llama tie={tie} n_kv_heads={n_kv_heads}: max|delta| = {delta:.3e}")
    assert delta <= 1e-4


def test_llama_save_round_trip_keeps_the_llama_layout(tmp_path):
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    hf = llama(tmp_path / "src", tie=False)
    out = save(load_model(tmp_path / "src"), tmp_path / "out")
    names = set(load_file(out / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.0.mlp.gate_proj.weight" in names
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n in names)
    again = LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, VOCAB, (1, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, atol=0, rtol=0)


def test_llama_config_round_trip_and_refusals():
    hf = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    cfg = Config.from_hf(hf)
    assert (cfg.norm_eps, cfg.eos_token_id, cfg.pad_token_id) == (1e-6, 2, None)  # LlamaConfig's defaults
    assert not cfg.longrope and cfg.sliding_window is None
    back = cfg.to_hf()
    assert back["architectures"] == ["LlamaForCausalLM"] and "sliding_window" not in back
    assert Config.from_hf(back) == cfg
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'llama3'"):
        Config.from_hf(hf | {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="attention_bias"):
        Config.from_hf(hf | {"attention_bias": True})
