"""Recipes: one readable script each (setup, loop, save) with main(argv), run as `phikit <name>`."""

from __future__ import annotations

import argparse


def run_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The command line every training recipe takes: --config, --out, --resume, --ddp, --threads.

    name: the recipe (`phikit <name>`, its module `phikit.recipes.<name>`); doc: its module docstring, whose
    first line "...: description" gives the description."""
    p = argparse.ArgumentParser(prog=f"phikit {name}", description=doc.split("\n")[0].split(": ", 1)[1])
    p.add_argument("--config", required=True, help=f"YAML or JSON config file (schema: `pydoc phikit.recipes.{name}`)")
    p.add_argument("--out", required=True, help="run directory for metrics, checkpoints and the final model")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                   help="continue from the newest checkpoint under --out, or from CKPT (default: start a new run)")
    p.add_argument("--ddp", action="store_true", help="under torchrun, use DDP instead of FSDP2 (default: FSDP2)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: train.threads)")
    return p
