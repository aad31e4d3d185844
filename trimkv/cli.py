"""``trimkv`` command line: train / push / demo."""
from __future__ import annotations

import argparse
import os
import sys


def _train(args: argparse.Namespace) -> int:
    from .train.run import finetune

    out = finetune(args.recipe, overrides=args.set, progress=not args.quiet, resume=args.resume or None)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank runs this
        print(f"gate checkpoint: {out}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .checkpoint import push_to_hub

    url = push_to_hub(args.checkpoint, args.repo_id, private=args.private, revision=args.revision)
    print(url)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(retrain=args.retrain, steps=args.steps, context=args.context, budget=args.budget)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trimkv", description="TRIM-KV retention gates: train, share, serve")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train gates from a recipe YAML")
    t.add_argument("recipe", help="path to a recipe, e.g. recipes/smollm2-135m-prose-m64.yaml")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a recipe field (repeatable), e.g. --set train.steps=10")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest valid training checkpoint in <run_dir>/checkpoints")
    t.set_defaults(func=_train)

    h = sub.add_parser("push", help="upload a gate checkpoint folder to the Hugging Face Hub")
    h.add_argument("checkpoint")
    h.add_argument("repo_id")
    h.add_argument("--private", action="store_true")
    h.add_argument("--revision", default=None)
    h.set_defaults(func=_push)

    d = sub.add_parser("demo", help="train (or load) gates on the embedded SmolLM2 and compare full vs bounded cache")
    d.add_argument("--retrain", action="store_true", help="train new gates even if checkpoints/ has some")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the demo recipe's)")
    d.add_argument("--context", type=int, default=2048, help="prompt length in tokens")
    d.add_argument("--budget", type=int, default=None, help="tokens per KV head (default: the gates' budget)")
    d.set_defaults(func=_demo)

    from .eval.cli import add_commands as add_eval_commands   # eval, plot

    add_eval_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
