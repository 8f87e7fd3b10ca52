"""Training checkpoints: model, optimizer, RNG and loop state, written atomically, verified on load.

Layout, one directory per saved step (never modified after it gets its name):

    OUT/checkpoints/step-000120/state.safetensors   model/<name>, optim/<name>/<key>, rng/torch
    OUT/checkpoints/step-000120/state.json          loop state (step, tokens, data position, schedule), AdamW
                                                    param_groups, world size, and the SHA-256 of the tensors file

A checkpoint is written under a temporary name (`.step-000120.tmp`) and renamed into place only when
both files are complete and synced, so a kill at any moment leaves the previous checkpoints intact; the
oldest are deleted only after the new one exists. `latest()` is the highest complete step directory.
On load the SHA-256 is checked, so a truncated or altered file is an error naming it, never a silently
different run. Tensors go to safetensors and the rest to JSON: nothing is unpickled.

Under FSDP2 or DDP the state is gathered to full (unsharded) tensors with
`torch.distributed.checkpoint.state_dict` and written by rank 0; every rank reads the files on resume and
keeps its own shard. A checkpoint is therefore independent of the number of processes. This gathers the
whole model and optimizer into rank 0's CPU memory: right for the models this is meant for, not for
ones whose optimizer state does not fit on one host (use torch.distributed.checkpoint's sharded save then).

References: torchtune `training/checkpointing`; PyTorch `torch.distributed.checkpoint.state_dict`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..checkpoint import CheckpointError

FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model state dict on CPU (rank 0 gets it; other ranks get {} under FSDP). Collective."""
    return get_model_state_dict(model, options=_FULL)


def trainable_names(model: torch.nn.Module) -> set[str]:
    """State-dict names of the parameters that train (DDP's `module.` prefix removed)."""
    return {n.removeprefix("module.") for n, p in model.named_parameters() if p.requires_grad}


def save(root: str | os.PathLike, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         loop_state: dict, keep: int = 2, trainable_only: bool = False) -> Path | None:
    """Write OUT/checkpoints/step-N atomically; call on every rank (gathering is collective), rank 0 writes.

    trainable_only: store only the parameters that train (a LoRA run: the adapter, not the frozen base,
    which is reloaded from where it came from)."""
    msd = full_model_state(model)
    if trainable_only:
        keep_names = trainable_names(model)
        msd = {k: v for k, v in msd.items() if k in keep_names}
    osd = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if _rank() != 0:
        return None
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # leftover of a run killed while saving
    tmp.mkdir()
    tensors = {f"model/{k}": v.contiguous() for k, v in msd.items()}
    for name, per_param in osd["state"].items():
        for key, value in per_param.items():
            tensors[f"optim/{name}/{key}"] = value.detach().reshape(value.shape).contiguous()
    tensors["rng/torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "state.safetensors"))
    _fsync(tmp / "state.safetensors")
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    meta = {"format": FORMAT, **loop_state, "step": step, "optimizer_param_groups": groups,
            "trainable_only": trainable_only,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "sha256": {"state.safetensors": _sha256(tmp / "state.safetensors")}}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1) + "\n")
    _fsync(tmp / "state.json")
    if final.exists():  # the same step saved by an earlier, interrupted run: replace it only now
        old = root / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    for stale in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(stale)
    return final


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories under root, oldest first (temporary ones are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest(root: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def read(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(state.json contents, tensors) of a checkpoint directory, verified; CheckpointError names a bad file."""
    path = Path(path)
    meta_file, tensor_file = path / "state.json", path / "state.safetensors"
    for f in (meta_file, tensor_file):
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: {path} is not a complete training checkpoint")
    try:
        meta = json.loads(meta_file.read_text())
        expected = meta["sha256"]["state.safetensors"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{meta_file} is corrupt (not the JSON a checkpoint writes: {e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_file}: unsupported checkpoint format {meta.get('format')!r}")
    if _sha256(tensor_file) != expected:
        raise CheckpointError(f"{tensor_file} is corrupt or truncated (its SHA-256 differs from the one recorded in "
                              f"{meta_file.name}); resume from an earlier checkpoint with --resume DIR")
    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{tensor_file} cannot be read: {e}") from None
    return meta, tensors


def restore(meta: dict, tensors: dict[str, torch.Tensor], model: torch.nn.Module,
            optimizer: torch.optim.Optimizer) -> None:
    """Put what read() returned into the model, optimizer and torch RNG (every rank)."""
    msd = {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
    state: dict[str, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            name, key = k.removeprefix("optim/").rsplit("/", 1)
            state.setdefault(name, {})[key] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["optimizer_param_groups"]]
    try:
        partial = bool(meta.get("trainable_only"))
        if partial and set(msd) != trainable_names(model):
            raise KeyError(f"the checkpoint holds {len(msd)} trainable tensors, the model trains "
                           f"{len(trainable_names(model))} (other adapter targets or rank?)")
        set_model_state_dict(model, msd, options=StateDictOptions(full_state_dict=True, strict=not partial))
        set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True))
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"the checkpoint does not fit this model and optimizer (was the config changed?): {e}"
                              ) from None
    torch.set_rng_state(tensors["rng/torch"])
