"""``trimkv recipes list|copy``, ``trimkv export`` and ``trimkv splice``: the commands about what ships with the package
and where gates go (registered on the main parser by :func:`add_commands`; the logic lives in :mod:`trimkv.shipped`,
:func:`trimkv.share.export_checkpoint` and :mod:`trimkv.share.splice`).

    trimkv recipes list                                   # the shipped recipes, one line each
    trimkv recipes copy smollm2-135m-qa-m64 my.yaml       # a copy to edit (torchtune's `tune cp`)
    trimkv export checkpoints/G out/G --format authors    # the authors' layout, for their inference package
    trimkv splice checkpoints/A checkpoints/B --layers 15-29 --out runs/AB   # A's gates, layers 15-29 from B
"""
from __future__ import annotations

import argparse
import sys

from .command import add_command, integers
from .limits import MAX_LAYERS


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


def _splice(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .errors import GateCheckpointError, UsageError
    from .share.splice import splice_checkpoints

    if Path(args.out).exists() and not args.overwrite:
        raise UsageError(f"--out {args.out} exists: give a new folder, or --overwrite to replace it")
    try:
        print(splice_checkpoints(args.base, args.other, args.layers, args.out))
    except GateCheckpointError:
        raise
    except ValueError as err:                  # layers beyond these gates' own
        raise UsageError(str(err)) from None
    return 0


def add_commands(sub) -> None:
    """Add ``recipes``, ``export`` and ``splice`` to the ``trimkv`` parser's sub-commands."""
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

    sp = add_command(sub, "splice", _splice, "gates of one checkpoint with some layers' gates taken from another",
                     description="Write the gates of BASE with the gates of --layers taken from OTHER (two "
                     "checkpoints of one model, gate type and width; trimkv.share.splice), e.g. distilled gates "
                     "where the model builds its representations and trace-fitted ones where it reads facts back.")
    sp.add_argument("base", help="a gate checkpoint folder or Hub id")
    sp.add_argument("other", help="the checkpoint the --layers come from")
    sp.add_argument("--layers", type=integers(0, MAX_LAYERS - 1, "a layer index"), required=True,
                    help="layers taken from OTHER, e.g. 15-29 or 0,3,5-7")
    sp.add_argument("--out", required=True, help="the gate checkpoint folder to write")
    sp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
