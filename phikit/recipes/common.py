"""What the fine-tuning recipes (`phikit sft`, `phikit dpo`) share: the config's common keys, the base model,
the LoRA adapter, resuming, and the final save. Each function takes the recipe's name for its messages and
exits with one line `phikit <name>: what is wrong` on bad input."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

from .. import checkpoint as model_io
from ..train import checkpointing
from ..train.distributed import wrap
from ..train.optim import SCHEDULES, make_optimizer
from ..train.run_files import RunFileError, read_config

LORA_DEFAULTS = {"r": 16, "alpha": 32, "dropout": 0.05, "targets": "all-linear", "rslora": False}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def fail(name: str, msg: str):
    raise SystemExit(f"phikit {name}: {msg}")


def load_config(name: str, path: Path, defaults: dict, data_paths=("train", "val", "cache_dir")) -> dict:
    """The config over defaults with the keys every fine-tuning recipe has checked: `model` and `data.train`
    required, paths made absolute (relative to the file), lora filled in, optim/train values valid."""
    try:
        cfg = read_config(path, defaults)
    except RunFileError as e:
        fail(name, str(e))
    here, d, t, o = path.resolve().parent, cfg["data"], cfg["train"], cfg["optim"]
    if not cfg["model"] or not d["train"]:
        fail(name, f"{path}: `model` (the base to fine-tune) and `data.train` are required")
    for local in (here / str(cfg["model"]), Path(str(cfg["model"])).expanduser()):
        if local.exists():  # a path relative to the config file or to the working directory; otherwise a hub id
            cfg["model"] = str(local.resolve())
            break
    for key in data_paths:
        if d[key]:
            d[key] = str(here / d[key])
    if cfg["lora"] is not None:
        if not isinstance(cfg["lora"], dict) or set(cfg["lora"]) - set(LORA_DEFAULTS):
            fail(name, f"{path}: lora must be a mapping with keys among {', '.join(LORA_DEFAULTS)}")
        cfg["lora"] = {**LORA_DEFAULTS, **cfg["lora"]}
    checks = [(d["overflow"] in ("drop", "truncate"), "data.overflow must be drop or truncate"),
              (int(d["max_len"]) >= 2, "data.max_len must be >= 2"),
              (t["precision"] in ("float32", "bf16"), "train.precision must be float32 or bf16"),
              (cfg["base_dtype"] in ("auto", *DTYPES), "base_dtype must be auto, float32 or bfloat16"),
              (o["schedule"] in SCHEDULES, f"optim.schedule must be one of {', '.join(SCHEDULES)}"),
              (t["batch_size"] % t["micro_batch"] == 0, "train.batch_size must be a multiple of train.micro_batch"),
              (t["max_steps"] is not None or t["epochs"] > 0, "train.epochs must be > 0 (or set train.max_steps)")]
    for ok, msg in checks:
        if not ok:
            fail(name, f"{path}: {msg}")
    return cfg


def load_base(name: str, cfg: dict):
    """(model, tokenizer) of the base, in the dtype that trains: float32 for a full fine-tune, the
    checkpoint's own for a frozen LoRA base unless base_dtype says otherwise."""
    from .. import load
    from ..config import ConfigError
    from ..gguf_io import GGUFError
    from ..tokenizer import TokenizerError

    dtype = None if cfg["base_dtype"] == "auto" else DTYPES[cfg["base_dtype"]]
    if cfg["lora"] is None and dtype is None:
        dtype = torch.float32  # full fine-tuning keeps float32 master weights (bf16 autocast computes in bf16)
    try:
        model, tokenizer = load(cfg["model"], dtype=dtype, revision=cfg["revision"])
    except (model_io.CheckpointError, ConfigError, TokenizerError, GGUFError, MemoryError, ValueError) as e:
        fail(name, f"base model {cfg['model']}: {e}")
    if tokenizer is None:
        fail(name, f"base model {cfg['model']} has no tokenizer.json; fine-tuning renders chat text through it")
    from ..train.lora import adapter_names, merge_lora
    if adapter_names(model):  # an adapter directory (e.g. a LoRA SFT run's final): training starts from base + it
        try:
            for adapter in adapter_names(model):
                merge_lora(model, adapter)
        except ValueError as e:
            fail(name, f"base model {cfg['model']}: {e}")
        model.requires_grad_(cfg["lora"] is None)  # loading the adapter froze the base
    if model.cfg.quantization is not None and cfg["lora"] is None:
        fail(name, f"{cfg['model']} is quantized: a quantized base trains only with LoRA (QLoRA); add a `lora:` "
             "section or fine-tune the float checkpoint")
    return model, tokenizer


def add_lora(name: str, model, cfg: dict) -> None:
    """The config's LoRA adapter on the model (only it trains); with bf16 autocast the frozen base is stored in
    the bf16 it would be rounded to at every step, once."""
    from ..train.lora import apply_lora, cast_frozen_linears

    lc = cfg["lora"]
    try:
        apply_lora(model, lc["targets"], r=lc["r"], alpha=lc["alpha"], dropout=lc["dropout"], rslora=lc["rslora"])
    except ValueError as e:
        fail(name, f"lora: {e}")
    if cfg["train"]["precision"] == "bf16":
        cast_frozen_linears(model, torch.bfloat16)


def pad_id_for(tokenizer) -> int:
    """An id for padding that is not a stop id (padding is never trained nor attended, but a pad id equal to
    a stop id is how fine-tuned models learn never to stop, where labels are masked by comparing with it)."""
    from ..chat_format import stop_ids

    stops = stop_ids(tokenizer)
    for candidate in (tokenizer.token_to_id(tokenizer.pad_token), tokenizer.token_to_id(tokenizer.unk_token), 0):
        if candidate is not None and candidate not in stops:
            return candidate
    return next(i for i in range(tokenizer.vocab_size) if i not in stops)


def checkpoint_blocks(model) -> None:
    """Recompute each block's activations in the backward instead of keeping them (memory for compute)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def prepare_training(name: str, model, cfg: dict, world: int, ddp: bool, device):
    """Seed, the LoRA adapter, device, activation checkpointing, compile, FSDP2/DDP wrapping and AdamW:
    (the model itself, the model as trained (wrapped), the optimizer)."""
    t, o = cfg["train"], cfg["optim"]
    torch.manual_seed(cfg["seed"])  # LoRA init and dropout
    if cfg["lora"] is not None:
        add_lora(name, model, cfg)
    model.to(device).train()
    if t["activation_checkpointing"]:
        checkpoint_blocks(model)
    if t["compile"]:
        for block in model.layers:
            block.compile()  # in place: parameter names (and checkpoints) stay the same
    wrapped = wrap(model, world, ddp, device)
    return model, wrapped, make_optimizer(wrapped, o["lr"], o["weight_decay"], o["betas"], o["eps"])


def restore(name: str, resume, model, optimizer) -> int:
    """The step to continue from: 0 for a new run; else find_resume's checkpoint put into model and optimizer."""
    if resume is None:
        return 0
    resume_from, resumed = resume
    try:
        checkpointing.restore(*resumed, model, optimizer)
    except model_io.CheckpointError as e:
        fail(name, f"{resume_from}: {e}")
    return resumed[0]["step"]


def find_resume(name: str, args, cfg: dict, out: Path):
    """What --resume points at, read and verified (None for a new run, which must not overwrite an old one)."""
    ckpt_root = out / "checkpoints"
    if not args.resume:
        if (out / "metrics.jsonl").exists() or checkpointing.latest(ckpt_root):
            fail(name, f"{out} already holds a run; pass --resume to continue it, or choose another --out")
        return None
    resume_from = checkpointing.latest(ckpt_root) if args.resume == "latest" else Path(args.resume)
    if resume_from is None:
        fail(name, f"--resume: no checkpoint under {ckpt_root}")
    try:
        resumed = checkpointing.read(resume_from)
    except model_io.CheckpointError as e:
        fail(name, str(e))
    if resumed[0].get("config") != cfg:
        print(f"phikit {name}: warning: {args.config} differs from the config {resume_from} was trained with; "
              "the run will not match an uninterrupted one", file=sys.stderr)
    return resume_from, resumed


def save_final(model, cfg: dict, tokenizer, path: Path) -> None:
    """DIR/final: the adapter (PEFT's format, naming its base) after LoRA, else the full model in the base's dtype."""
    model.eval()
    if cfg["lora"] is not None:
        from ..train.adapters import save_adapter
        save_adapter(model, path, base_model=cfg["model"], tokenizer=tokenizer)
        return
    dtype = getattr(torch, model.cfg.torch_dtype, torch.float32)
    if cfg["base_dtype"] != "auto":
        dtype = DTYPES[cfg["base_dtype"]]
    model_io.save(model.to(dtype), path, tokenizer)


def gathered_final(name: str, cfg: dict, model, world: int, ddp: bool, base_model):
    """The model to save on rank 0: the unwrapped model, or under FSDP2 (shards) a fresh copy of the base
    (with the adapter) holding the gathered state. Collective: call on every rank."""
    state = checkpointing.full_model_state(model)
    if world == 1 or ddp or checkpointing._rank() != 0:
        return base_model
    fresh, _ = load_base(name, cfg)
    if cfg["lora"] is not None:
        add_lora(name, fresh, cfg)
    fresh.load_state_dict(state, strict=False)
    return fresh
