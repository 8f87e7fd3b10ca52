"""DPO: log-probabilities, losses and gradients equal TRL `DPOTrainer`'s (full and with a PEFT adapter), the
preference data (formats, errors, counts), and the recipe (a run, resume bit for bit, precomputed reference)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny_tokenizer
import torch
from tiny import tiny_config, write_checkpoint

from phikit.checkpoint import load_model
from phikit.data import preference
from phikit.data.sft import SFTDataError
from phikit.recipes.common import pad_id_for
from phikit.recipes.dpo import DEFAULTS, batch_logps, batch_loss
from phikit.tokenizer import Tokenizer
from phikit.train.lora import disabled

PRESET = "phi-3-mini-4k-instruct"  # no LongRoPE: transformers picks its factors by the padded length
QUESTIONS = ["What is the capital of France?", "Add two and three.", "Name a colour.", "Is the sky blue?",
             "Say hello.", "What is a fox?", "Count to three.", "Who are you?"]
GOOD = ["Paris is the capital.", "Two and three is five.", "Blue.", "Yes, it is blue.", "Hello!",
        "A fox is a quick brown animal.", "One, two, three.", "I am a helpful assistant."]
BAD = ["The capital is the lazy dog.", "It is seven.", "I do not know colours at all, sorry.", "No.",
       "Goodbye.", "A fox is a kind of dog that jumps.", "Three, two.", "Nobody."]


def pair_rows():
    """8 pairs in TRL's three forms: messages (one with a system turn), strings, implicit prompt."""
    rows = []
    for i, (q, good, bad) in enumerate(zip(QUESTIONS, GOOD, BAD)):
        prompt = ([{"role": "system", "content": "Answer briefly."}] if i == 1 else []) + [{"role": "user", "content": q}]
        if i % 3 == 0:
            rows.append({"prompt": q, "chosen": good, "rejected": bad})
        elif i % 3 == 1:
            rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}]})
        else:
            rows.append({"chosen": prompt + [{"role": "assistant", "content": good}],
                         "rejected": prompt + [{"role": "assistant", "content": bad}]})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo")
    write_checkpoint(tiny_config(PRESET), d / "ckpt")
    tiny_tokenizer.build(PRESET, d / "ckpt")
    tok = Tokenizer(str(d / "ckpt"))
    ds = preference.load_preference_dataset(write_jsonl(d / "pairs.jsonl", pair_rows()), tok, cache_dir=d / "cache")
    return {"dir": d, "ckpt": d / "ckpt", "tok": tok, "pairs": ds.pairs, "pad": pad_id_for(tok)}


def trl_examples(pairs):
    """TRL's tokenized form of phikit's pairs: prompt_ids, then each response's ids up to its last trained token."""
    out = []
    for c, ct, r, rt in pairs:
        firsts = [int((t != -100).nonzero()[0]) for t in (ct, rt)]
        lasts = [int((t != -100).nonzero()[-1]) for t in (ct, rt)]
        assert firsts[0] == firsts[1] and c[:firsts[0] + 1].tolist() == r[:firsts[1] + 1].tolist()  # one prompt
        p = firsts[0] + 1
        out.append({"prompt_ids": c[:p].tolist(), "chosen_ids": c[p:lasts[0] + 2].tolist(),
                    "rejected_ids": r[p:lasts[1] + 2].tolist()})
    return out


def trl_trainer(model, env, tmp_path, peft_config=None, **dpo):
    import datasets
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    tok = env["tok"]
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(env["ckpt"] / "tokenizer.json"), eos_token=tok.eos_token,
                                     pad_token=tok.pad_token or tok.eos_token)
    hf_tok.chat_template = tok.chat_template
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, per_device_train_batch_size=8,
                     max_length=None, bf16=False, **dpo)
    data = datasets.Dataset.from_list([{"prompt": "Hi", "chosen": " a", "rejected": " b"}])
    return DPOTrainer(model=model, args=args, train_dataset=data, processing_class=hf_tok, peft_config=peft_config)


def phikit_step(env, model, cfg_dpo, ref_model=None, lora=False):
    """The recipe's loss on the 8 pairs as one micro-batch (reference: a copy, or the adapter off), and its metrics."""
    cfg = {"dpo": {**DEFAULTS["dpo"], **cfg_dpo}}
    batch = preference.collate_pairs(env["pairs"], env["pad"])
    with torch.no_grad():
        if lora:
            with disabled(model):
                reference = batch_logps(model, batch)
        else:
            reference = batch_logps(ref_model, batch)
    policy = batch_logps(model, batch)
    P = len(env["pairs"])
    loss, sums = batch_loss(cfg, policy, reference, batch["tokens"], P, batch["tokens"][:P].sum())
    return loss, sums / P, policy, reference


def hf_name(name):
    return name if name == "lm_head.weight" else "model." + name


@pytest.mark.parametrize("dpo,trl", [
    ({"loss": "sigmoid", "beta": 0.1}, {"loss_type": ["sigmoid"], "beta": 0.1}),
    ({"loss": "robust", "beta": 0.2, "label_smoothing": 0.1}, {"loss_type": ["robust"], "beta": 0.2,
                                                               "label_smoothing": 0.1}),
    ({"loss": "ipo", "beta": 0.5}, {"loss_type": ["ipo"], "beta": 0.5}),
    ({"loss": "sigmoid", "beta": 0.1, "rpo_alpha": 0.5}, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5],
                                                          "beta": 0.1}),
])
def test_full_dpo_equals_trl(env, dpo, trl, tmp_path):
    """Reference = the initial model; logps per pair, the first step's loss and metrics, and its gradient."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from transformers import Phi3ForCausalLM

    hf = Phi3ForCausalLM.from_pretrained(env["ckpt"]).float().train()
    trainer = trl_trainer(hf, env, tmp_path, **trl)
    batch = DataCollatorForPreference(pad_token_id=env["pad"])(trl_examples(env["pairs"]))
    loss_trl = trainer.compute_loss(trainer.model, batch)
    loss_trl.backward()
    trl_c, trl_r = trainer.compute_ref_log_probs(trainer.model, batch)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    model, ref_model = load_model(env["ckpt"], dtype=torch.float32), load_model(env["ckpt"], dtype=torch.float32)
    model.train()
    loss, means, policy, reference = phikit_step(env, model, dpo, ref_model=ref_model)
    loss.backward()
    P = len(env["pairs"])
    torch.testing.assert_close(policy[:P], trl_c.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(policy[P:], trl_r.float(), atol=1e-5, rtol=0)
    assert abs(loss.item() - loss_trl.item()) < 1e-5
    for k, v in zip(("loss",) + tuple(metrics_names()), means.tolist()):
        if k in metrics:
            assert abs(v - metrics[k]) < 1e-4 * max(1.0, abs(metrics[k])), k
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        g, g_ref = p.grad, hf_params[hf_name(name)].grad
        assert (g - g_ref).norm() <= 1e-4 * g_ref.norm() + 1e-12, name


def metrics_names():
    from phikit.recipes.dpo import PAIR_METRICS
    return PAIR_METRICS


def test_conservative_dpo_equals_trl_per_pair(env, tmp_path):
    """Label-smoothed (conservative) sigmoid DPO: TRL 1.x computes it as loss_type "aot", whose sort over the batch
    is the identity for a batch of one pair."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from transformers import Phi3ForCausalLM

    hf = Phi3ForCausalLM.from_pretrained(env["ckpt"]).float()
    trainer = trl_trainer(hf, env, tmp_path, loss_type=["aot"], beta=0.3, label_smoothing=0.2)
    model = load_model(env["ckpt"], dtype=torch.float32)
    with torch.no_grad():  # policy one step away from the reference, so that the loss is not log 2 everywhere
        hf_params = dict(hf.named_parameters())
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p), alpha=0.01)
            hf_params[hf_name(name)].copy_(p)
    ref_model = load_model(env["ckpt"], dtype=torch.float32)
    examples = trl_examples(env["pairs"])
    for i in range(len(examples)):
        one = {**env, "pairs": env["pairs"][i:i + 1]}
        loss, *_ = phikit_step(one, model, {"loss": "sigmoid", "beta": 0.3, "label_smoothing": 0.2}, ref_model=ref_model)
        with torch.no_grad():
            loss_trl = trainer.compute_loss(trainer.model, DataCollatorForPreference(pad_token_id=env["pad"])(
                examples[i:i + 1]))
        assert abs(loss.item() - loss_trl.item()) < 1e-5


def test_lora_dpo_equals_trl_with_peft(env, tmp_path):
    """LoRA with the reference = the adapter switched off, against TRL with a PEFT model (ref_model=None)."""
    from peft import LoraConfig
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from transformers import Phi3ForCausalLM

    from phikit.train.adapters import load_adapter

    # TRL makes the adapter itself from peft_config, so that its reference is the adapter switched off (a PeftModel
    # passed in with its own adapter would get a frozen copy of that adapter as the reference instead)
    lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                      target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    trainer = trl_trainer(Phi3ForCausalLM.from_pretrained(env["ckpt"]).float(), env, tmp_path, peft_config=lora,
                          loss_type=["sigmoid"], beta=0.1)
    peft_model = trainer.model
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-zero B: the policy differs from the reference
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.train()
    batch = DataCollatorForPreference(pad_token_id=env["pad"])(trl_examples(env["pairs"]))
    loss_trl = trainer.compute_loss(trainer.model, batch)
    loss_trl.backward()
    ref_c, ref_r = trainer.compute_ref_log_probs(trainer.model, batch)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    model = load_model(env["ckpt"], dtype=torch.float32)
    load_adapter(model, tmp_path / "adapter")
    model.train()
    loss, means, policy, reference = phikit_step(env, model, {"loss": "sigmoid", "beta": 0.1}, lora=True)
    loss.backward()
    P = len(env["pairs"])
    torch.testing.assert_close(reference[:P], ref_c.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(reference[P:], ref_r.float(), atol=1e-5, rtol=0)
    assert abs(loss.item() - loss_trl.item()) < 1e-5
    assert abs(means[5].item() - metrics["logps/chosen"]) < 1e-4 * abs(metrics["logps/chosen"])
    assert abs(means[6].item() - metrics["logps/rejected"]) < 1e-4 * abs(metrics["logps/rejected"])
    assert abs(means[3].item() - metrics["rewards/margins"]) < 1e-4 * max(1, abs(metrics["rewards/margins"]))
    # adapter gradients: phikit's fused A/B are PEFT's (the same layers, the same names but the prefix)
    peft_grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    checked = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = "base_model.model.model." + name.replace(".lora_A.default.", ".lora_A.default.").replace(
                ".lora_B.default.", ".lora_B.default.")
            g_ref = peft_grads[key]
            assert (p.grad - g_ref).norm() <= 1e-4 * g_ref.norm() + 1e-12, name
            checked += 1
    assert checked == len(peft_grads)


def test_tokenization_matches_trl(env, tmp_path):
    """TRL's own tokenization of the same conversational rows: the same prompt ids, and its response ids start with
    exactly the tokens phikit scores (TRL also scores what the template renders after the end-of-turn token).
    (String rows differ by design: TRL reads them as raw text, phikit as one user / assistant message.)"""
    import datasets
    from transformers import Phi3ForCausalLM

    trainer = trl_trainer(Phi3ForCausalLM.from_pretrained(env["ckpt"]).float(), env, tmp_path)
    data = [trainer._prepare_dataset(datasets.Dataset.from_list([row]), trainer.processing_class, trainer.args,
                                     "test")[0] if not isinstance(row.get("prompt"), str) else None
            for row in pair_rows()]  # one dataset a row: one format a column
    eot = env["tok"].token_to_id("<|end|>")
    checked = [(o, t) for o, t in zip(trl_examples(env["pairs"]), data) if t is not None]
    assert len(checked) >= 5
    for ours, theirs in checked:
        assert ours["prompt_ids"] == theirs["prompt_ids"]
        for side in ("chosen_ids", "rejected_ids"):
            assert theirs[side][:len(ours[side])] == ours[side] and ours[side][-1] == eot
            assert env["tok"].decode(theirs[side][len(ours[side]):]).strip() in ("", env["tok"].eos_token)


# ---- data ------------------------------------------------------------------------------------------------

def test_forms_give_the_same_pairs(env):
    """The implicit prompt and the explicit one give the same ids; strings are one user / assistant message."""
    prompt = [{"role": "user", "content": "Say hello."}]
    rows = [{"prompt": "Say hello.", "chosen": "Hello!", "rejected": "Goodbye."},
            {"prompt": prompt, "chosen": [{"role": "assistant", "content": "Hello!"}],
             "rejected": [{"role": "assistant", "content": "Goodbye."}]},
            {"chosen": prompt + [{"role": "assistant", "content": "Hello!"}],
             "rejected": prompt + [{"role": "assistant", "content": "Goodbye."}]}]
    assert preference.to_pair(rows[0]) == preference.to_pair(rows[1]) == preference.to_pair(rows[2])


@pytest.mark.parametrize("row,expected", [
    ({"prompt": "Hi", "chosen": "", "rejected": "Bye"}, "chosen[0]: empty chosen response"),
    ({"prompt": "Hi", "chosen": "Hello", "rejected": "  "}, "rejected[0]: empty rejected response"),
    ({"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}]}, "prompts differ"),
    ({"prompt": "Hi", "chosen": "Hello"}, "needs 'chosen' and 'rejected'"),
    ({"chosen": "Hello", "rejected": "Bye"}, "whole conversations"),
    ({"prompt": "Hi", "chosen": [{"role": "user", "content": "x"}], "rejected": "Bye"}, "starts with an assistant"),
])
def test_bad_rows_name_the_row(env, tmp_path, row, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", [pair_rows()[0], row])
    with pytest.raises(SFTDataError, match=r"bad\.jsonl:2: .*" + re.escape(expected)) as e:
        preference.load_preference_dataset(path, env["tok"], cache_dir=tmp_path / "cache")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_identical_and_long_pairs_are_counted(env, tmp_path):
    rows = pair_rows() + [{"prompt": "Hi", "chosen": "Same.", "rejected": "Same."},
                          {"prompt": "Hi", "chosen": "word " * 200, "rejected": "Bye."}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    ds = preference.load_preference_dataset(path, env["tok"], max_len=64, cache_dir=tmp_path / "c")
    assert (ds.stats["identical"], ds.stats["dropped_too_long"], ds.stats["kept"]) == (1, 1, 8)
    ds = preference.load_preference_dataset(path, env["tok"], max_len=64, overflow="truncate", cache_dir=tmp_path / "c")
    assert (ds.stats["identical"], ds.stats["truncated"], ds.stats["kept"]) == (1, 1, 9)
    c, ct, r, rt = ds.pairs[-1]
    assert len(c) == 64 and ct[-1] == -100 and len(r) < 64
    again = preference.load_preference_dataset(path, env["tok"], max_len=64, overflow="truncate",
                                               cache_dir=tmp_path / "c")  # from the cache
    assert all(torch.equal(a, b) for p, q in zip(ds.pairs, again.pairs) for a, b in zip(p, q))


def test_packed_batch_gives_the_padded_logps(env):
    model = load_model(env["ckpt"], dtype=torch.float32)
    with torch.no_grad():
        padded = batch_logps(model, preference.collate_pairs(env["pairs"], env["pad"]))
        packed = batch_logps(model, preference.collate_pairs(env["pairs"], env["pad"], pack_len=64))
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)


# ---- the recipe --------------------------------------------------------------------------------------------

def run_dpo(config: dict, d: Path, out: Path, *extra, wait=True):
    cfg_path = d / f"{out.name}.json"
    cfg_path.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "phikit", "dpo", "--config", str(cfg_path), "--out", str(out), *extra]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def recipe_config(env, **over):
    rows = pair_rows() * 4
    write_jsonl(env["dir"] / "train.jsonl", rows)
    write_jsonl(env["dir"] / "val.jsonl", pair_rows())
    cfg = {"model": str(env["ckpt"]), "data": {"train": "train.jsonl", "val": "val.jsonl", "max_len": 64,
                                               "cache_dir": "cache"},
           "optim": {"lr": 1e-3, "warmup_steps": 1},
           "train": {"epochs": 2, "batch_size": 8, "micro_batch": 4, "threads": 1, "eval_every": 4,
                     "checkpoint_every": 2, "keep_checkpoints": 10}}
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("variant", ["full", "lora-precomputed"])
def test_recipe_runs_and_resumes_bit_for_bit(env, variant):
    d = env["dir"]
    over = {} if variant == "full" else {"lora": {"r": 4, "alpha": 8, "dropout": 0.1},
                                         "dpo": {"reference": "precomputed", "rpo_alpha": 0.5}}
    cfg = recipe_config(env, **over)
    full = run_dpo(cfg, d, d / f"{variant}-a")
    assert full.returncode == 0, full.stderr[-2000:]
    out = d / f"{variant}-a"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(k in records[-1] for k in ("rewards/chosen", "rewards/rejected",
                                                                 "rewards/margins", "rewards/accuracies",
                                                                 "logps/chosen", "logps/rejected",
                                                                 "eval_rewards/accuracies", "eval_loss"))
    assert (out / "loss.png").exists() and (out / "rewards.png").exists()
    assert records[-1]["loss"] < records[0]["loss"]
    final = out / "final"
    assert (final / ("adapter_config.json" if variant != "full" else "config.json")).exists()
    if variant != "full":
        assert (out / "reference_logps.safetensors").exists()
    # kill a second run after its step-4 checkpoint, resume it: the same losses, bit for bit
    b = d / f"{variant}-b"
    proc = run_dpo(cfg, d, b, wait=False)
    while proc.poll() is None and not (b / "checkpoints" / "step-000004" / "state.json").exists():
        time.sleep(0.02)  # not a busy loop: the run shares the machine's cores with this test
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = run_dpo(cfg, d, b, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(b) == losses(out)


def test_recipe_bad_config_is_one_line(env):
    cfg = recipe_config(env, dpo={"reference": "adapter-off"})
    r = run_dpo(cfg, env["dir"], env["dir"] / "bad")
    assert r.returncode != 0 and "adapter-off needs a `lora:` section" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_an_adapter_base_is_merged_and_the_new_adapter_loads_on_it(env, tmp_path):
    """DPO with LoRA on a LoRA SFT run's final (an adapter directory): training starts from base + that adapter,
    and the new adapter (naming the first as its base) loads back as base + first merged + second."""
    import phikit
    from phikit.train.adapters import save_adapter
    from phikit.train.lora import apply_lora, merge_lora

    first = load_model(env["ckpt"], dtype=torch.float32)
    apply_lora(first, "all-linear", r=4, alpha=8)
    with torch.no_grad():
        for n, p in first.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    save_adapter(first, tmp_path / "sft-adapter", base_model=str(env["ckpt"]), tokenizer=env["tok"])
    cfg = recipe_config(env, model=str(tmp_path / "sft-adapter"), lora={"r": 4, "alpha": 8, "dropout": 0.0},
                        train={"epochs": 1, "max_steps": 2})
    r = run_dpo(cfg, env["dir"], tmp_path / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    model, _ = phikit.load(tmp_path / "run" / "final")
    merged = merge_lora(first, "default")
    ids = env["pairs"][0][0].long()[None]
    with torch.no_grad():
        from phikit.train.lora import disabled
        with disabled(model):
            torch.testing.assert_close(model(ids), merged(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["fsdp-full-copy", pytest.param("ddp-lora-precomputed", marks=pytest.mark.slow)])
def test_two_processes_give_the_one_process_losses(env, tmp_path, variant):
    over = {"train": {"epochs": 1, "max_steps": 2}}
    if variant.startswith("ddp"):
        over.update(lora={"r": 4, "alpha": 8, "dropout": 0.0}, dpo={"reference": "precomputed"})
    cfg = recipe_config(env, **over)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps({**cfg, "data": {**cfg["data"], "train": str(env["dir"] / "train.jsonl"),
                                                    "val": str(env["dir"] / "val.jsonl"),
                                                    "cache_dir": str(tmp_path / "cache")}}))
    for name, launcher in (("one", [sys.executable]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc-per-node=2"])):
        extra = ["--ddp"] if name == "two" and variant.startswith("ddp") else []
        r = subprocess.run([*launcher, "-m", "phikit", "dpo", "--config", str(cfg_path), "--out", str(tmp_path / name),
                            *extra], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=1e-4)


def test_bf16_copy_reference_is_the_policy_at_the_start_with_tied_embeddings(tmp_path):
    """The frozen copy stored in bf16 (what autocast rounds the policy's matmul weights to) gives the policy's own
    numbers, also where lm_head is the embedding table (Phi-4-mini): that one is left in float32."""
    import copy

    from phikit.train.lora import cast_frozen_linears

    write_checkpoint(tiny_config("phi-4-mini-instruct"), tmp_path / "c")
    model = load_model(tmp_path / "c", dtype=torch.float32)
    assert model.cfg.tie_embeddings
    ref = copy.deepcopy(model).requires_grad_(False)
    assert cast_frozen_linears(ref) > 0
    assert ref.embed_tokens.weight.dtype == torch.float32 and ref.lm_head.weight is ref.embed_tokens.weight
    ids = torch.arange(40)[None]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(ids), ref(ids))


def test_identical_implicit_pairs_are_counted_not_refused(env, tmp_path):
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    path = write_jsonl(tmp_path / "p.jsonl", pair_rows() + [{"chosen": conversation, "rejected": conversation}])
    ds = preference.load_preference_dataset(path, env["tok"], cache_dir=tmp_path / "c")
    assert (ds.stats["identical"], ds.stats["kept"]) == (1, 8)


def test_resume_refuses_a_reference_table_of_other_pairs(env, tmp_path):
    cfg = recipe_config(env, lora={"r": 4, "alpha": 8, "dropout": 0.0}, dpo={"reference": "precomputed"},
                        train={"epochs": 1, "max_steps": 2})
    out = tmp_path / "run"
    assert run_dpo(cfg, env["dir"], out).returncode == 0
    rows = pair_rows() * 4
    rows[0] = {**rows[0], "chosen": rows[0]["chosen"] + " Indeed."}  # the same number of pairs, one changed
    write_jsonl(env["dir"] / "train.jsonl", rows)
    cfg["train"]["max_steps"] = 3
    r = run_dpo(cfg, env["dir"], out, "--resume")
    assert r.returncode != 0 and "computed for other pairs" in r.stderr, r.stderr[-2000:]
    write_jsonl(env["dir"] / "train.jsonl", pair_rows() * 4)
