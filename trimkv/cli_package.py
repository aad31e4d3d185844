"""``trimkv recipes list|copy`` and ``trimkv export``: the commands about what ships with the package and where gates
go (registered on the main parser by :func:`add_commands`; the logic lives in :mod:`trimkv.shipped` and
:func:`trimkv.share.export_checkpoint`).

    trimkv recipes list                                   # the shipped recipes, one line each
    trimkv recipes copy smollm2-135m-qa-m64 my.yaml       # a copy to edit (torchtune's `tune cp`)
    trimkv export checkpoints/G out/G --format authors    # the authors' layout, for their inference package
"""
from __future__ import annotations

import argparse
import sys

from .command import add_command


def _recipes_list(args: argparse.Namespace) -> int:
    from .shipped import list_recipes, recipes_dir

    rows = list_recipes()
    width = max((len(n) for n, _ in rows), default=0)
    for name, text in rows:
        print(f"{name:{width}s}  {text}")
    print(f"\n{len(rows)} recipes in {recipes_dir()}; copy one to edit it: trimkv recipes copy NAME [DEST]",
          file=sys.stderr)
    return 0


def _recipes_copy(args: argparse.Namespace) -> int:
    from .shipped import copy_recipe

    out = copy_recipe(args.name, args.dest, overwrite=args.overwrite)
    print(out)
    print(f"edit it, then: trimkv train {out}", file=sys.stderr)
    return 0


def _export(args: argparse.Namespace) -> int:
    from .share import export_checkpoint

    base_config = None
    if args.base_model:
        from .base_model import load_config

        base_config = load_config(args.base_model, revision=args.base_revision)
    print(export_checkpoint(args.checkpoint, args.out, format=args.format, base_config=base_config,
                            revision=args.revision))
    return 0


def add_commands(sub) -> None:
    """Add ``recipes`` and ``export`` to the ``trimkv`` parser's sub-commands."""
    r = sub.add_parser("recipes", help="list the recipes shipped with trimkv, or copy one to edit")
    rsub = r.add_subparsers(dest="recipes_command", required=True)
    add_command(rsub, "list", _recipes_list, "the shipped recipes, one line each")
    cp = add_command(rsub, "copy", _recipes_copy, "copy a shipped recipe (to DEST, a file or folder; default: here)")
    cp.add_argument("name", help="a name from `trimkv recipes list`, e.g. smollm2-135m-qa-m64")
    cp.add_argument("dest", nargs="?", default=None, help="a file or an existing folder (default: the current folder)")
    cp.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")

    e = add_command(sub, "export", _export, "write a gate checkpoint in another layout (the authors' inference package)")
    e.add_argument("checkpoint", help="a gate checkpoint folder or Hub id")
    e.add_argument("out", help="output folder")
    e.add_argument("--format", choices=("authors",), default="authors",
                   help="authors: config.json (base config + TRIM-KV fields) + trimkv_weights.pth")
    e.add_argument("--base-model", default=None,
                   help="read the base model's config from here (default: the base model the gates record)")
    e.add_argument("--base-revision", default=None, help="Hub revision of --base-model")
    e.add_argument("--revision", default=None, help="Hub revision of the checkpoint")
