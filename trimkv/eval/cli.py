"""``trimkv eval`` and ``trimkv plot``: the harness, long-text fidelity and the pictures from the command line.

    trimkv eval --gates checkpoints/smollm2 --tasks passkey,kv_retrieval --lengths 2048 \\
                --budgets 32,64,128 --policies full,trimkv,streaming,h2o --n 20 --out results/
    trimkv eval --fidelity --gates checkpoints/smollm2 --budgets 64,128 --policies trimkv,h2o --out results/
    trimkv plot accuracy results/                         # results/accuracy_vs_budget.png
    trimkv plot fidelity results/                         # results/fidelity_kl.png
    trimkv plot retention --gates checkpoints/smollm2 --out results/retention.png
    trimkv plot kept --gates checkpoints/smollm2 --budget 64 --policy trimkv --out results/kept.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _floats(text: str) -> list[float]:
    try:
        values = [float(t) for t in _csv(text)]
    except ValueError:
        values = []
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected two comma-separated fractions LO,HI, got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def load_for_gates(args):
    """``(model, tokenizer)`` as the command line says: ``--model`` (default: the base model recorded in ``--gates``,
    else the embedded SmolLM2), ``--dtype``, ``--device`` / ``--device-map``, ``--threads``."""
    import torch

    from trimkv.share import base_model_for, load_gate_config
    from trimkv.base_model import DEFAULT_MODEL, load_model

    if args.threads:
        torch.set_num_threads(args.threads)   # on a busy shared CPU, 1 thread can beat oversubscribed ones
    name = args.model or (base_model_for(load_gate_config(args.gates)) if args.gates else DEFAULT_MODEL)
    return load_model(name, dtype=args.dtype, device=args.device, device_map=args.device_map)


def _eval(args: argparse.Namespace) -> int:
    model, tok = load_for_gates(args)
    common = dict(budgets=args.budgets, policies=args.policies, gates=args.gates, seed=args.seed, sink=args.sink,
                  window=args.window, prefill_chunk=args.prefill_chunk, out_dir=args.out, progress=not args.quiet)
    if args.fidelity:
        from trimkv.eval.fidelity import fidelity_table, run_fidelity

        recs = run_fidelity(model, tok, n_texts=args.n, prefix_tokens=args.prefix, step=args.step,
                            continuation_tokens=args.continuation, **common)
        print(fidelity_table(recs))
        return 0
    from trimkv.eval.harness import markdown_table, run_eval

    recs = run_eval(model, tok, tasks=args.tasks, lengths=args.lengths, n_samples=args.n, haystack=args.haystack,
                    chat=args.chat, depths=args.depths, lookahead=args.lookahead,
                    max_new_tokens=args.max_new_tokens, **common)
    print(markdown_table(recs))
    print(f"results in {args.out}/ (metrics.json, predictions.jsonl, results.md)")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from trimkv.eval import plots

    if args.what in ("accuracy", "fidelity"):
        folders = [Path(f) for f in (args.results or ["."])]
        folder = folders[0]
        name = "metrics.json" if args.what == "accuracy" else "fidelity.json"
        missing = [str(f / name) for f in folders if not (f / name).is_file()]
        if missing:
            raise SystemExit(f"no {name} in {', '.join(missing)}: run `trimkv eval` with that --out first")
        recs = [r for f in folders for r in json.loads((f / name).read_text())]
        if args.what == "accuracy":
            out = plots.plot_accuracy_vs_budget(recs, args.out or folder / "accuracy_vs_budget.png")
        else:
            out = plots.plot_fidelity(recs, args.out or folder / f"fidelity_{args.metric}.png", metric=args.metric)
        print(out)
        return 0
    from trimkv.eval.harness import uses_gates

    if not args.gates and (args.what == "retention" or uses_gates(args.policy)):
        raise SystemExit(f"`trimkv plot {args.what}` needs --gates CKPT")
    model, tok = load_for_gates(args)
    if args.gates:
        from trimkv.share import load_gates

        load_gates(model, args.gates)
    from trimkv.data import corpus

    if args.task and args.text:
        raise SystemExit("`trimkv plot`: give --text or --task, not both")
    if args.task:                  # one prompt of an evaluation task, --tokens long, the needle at --depth
        from trimkv.eval.tasks import make_samples, render_prompt

        sample = make_samples(args.task, tok, context_length=args.tokens, n=1, seed=args.seed, depths=[args.depth])[0]
        text = render_prompt(sample, tok)
        print(f"{args.task} prompt of {args.tokens} tokens, answer {sample.answers} at depth {args.depth:g}")
    else:
        text = args.text or corpus.prose_text("eval", 8 * args.tokens, seed=args.seed)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :args.tokens]
    if args.what == "retention":
        out = plots.plot_retention_heatmap(plots.retention_by_head(model, ids, log=not args.beta),
                                           args.out or "retention.png", log=not args.beta)
    else:
        kept = plots.kept_positions(model, ids, budget=args.budget, policy=args.policy, sink=args.sink,
                                    window=args.window, prefill_chunk=args.prefill_chunk)
        toks = [tok.decode([i]) for i in ids[0].tolist()]
        from trimkv.serve.factory import model_shape

        out = plots.plot_kept_tokens(kept, args.out or "kept.png", num_kv_heads=model_shape(model)[1],
                                     tokens=toks, title=f"{args.policy}, M={args.budget}: kept tokens per head")
    print(out)
    return 0


def add_device_args(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype`` (shared by every command that loads a model)."""
    from trimkv.base_model import DTYPE_CHOICES

    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", choices=list(DTYPE_CHOICES),
                   help="weights dtype; auto = the checkpoint's own (bf16 for most Hub models, fp32 for smollm2)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="base model: smollm2 (embedded default), a Hub id or a folder (default: the base model the "
                        "--gates were trained for, else smollm2)")
    add_device_args(p)
    p.add_argument("--device-map", default=None,
                   help="split the model over the visible GPUs (e.g. auto; overrides --device); gates follow each layer")
    p.add_argument("--gates", default=None,
                   help="gate checkpoint: folder or Hub id, trimkv's layout or the authors' (needed for trimkv)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sink", type=int, default=4, help="first tokens always kept (every policy)")
    p.add_argument("--window", type=int, default=16, help="most recent tokens always kept (every policy)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill step")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def add_commands(sub) -> None:
    """Add ``eval`` and ``plot`` to the ``trimkv`` command's subparsers."""
    from trimkv.eval.harness import DEPTHS, policy_names
    from trimkv.eval.tasks import TASKS

    e = sub.add_parser("eval", help="accuracy (or --fidelity) of eviction policies over budgets, cached per cell")
    add_model_args(e)
    e.add_argument("--tasks", type=_csv, default=["passkey"], help=f"comma-separated, of: {','.join(TASKS)}")
    e.add_argument("--lengths", type=_ints, default=[2048], help="prompt lengths in tokens, e.g. 2048,4096")
    e.add_argument("--budgets", type=_ints, default=[32, 64, 128, 256, 512],
                   help="tokens per KV head (trimkv-global: the average; its pool holds budget x layers x KV heads)")
    e.add_argument("--policies", type=_csv, default=["full", "streaming", "h2o"],
                   help=f"comma-separated, of: {','.join(policy_names())}")
    e.add_argument("--n", type=int, default=20, help="samples per cell (texts with --fidelity)")
    e.add_argument("--haystack", default="filler", choices=["filler", "prose"])
    e.add_argument("--depths", type=_floats, default=list(DEPTHS), metavar="LO,HI",
                   help="needle depths spread evenly over [LO, HI] (fractions of the haystack)")
    e.add_argument("--chat", action="store_true",
                   help="wrap prompts in the chat template (default: RULER's plain template with an answer prefix; "
                        "SmolLM2-135M answers the pass key far more reliably that way)")
    e.add_argument("--max-new-tokens", type=int, default=None, help="default: per task")
    e.add_argument("--lookahead", type=int, default=0, metavar="N",
                   help="trimkv / trimkv-global: rank kept tokens by DBTrimKV's future utility over N steps "
                        "(0 = the plain retention score)")
    e.add_argument("--out", default="results", help="output folder (finished cells are reused)")
    e.add_argument("--fidelity", action="store_true", help="long-text KL / top-1 / ppl ratio instead of tasks")
    e.add_argument("--prefix", type=int, default=1024, help="--fidelity: prefilled tokens")
    e.add_argument("--continuation", type=int, default=256, help="--fidelity: teacher-forced tokens scored")
    e.add_argument("--step", type=int, default=1, help="--fidelity: continuation tokens per forward")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_eval)

    p = sub.add_parser("plot", help="PNG pictures: accuracy / fidelity curves, retention heat map, kept tokens")
    p.add_argument("what", choices=["accuracy", "fidelity", "retention", "kept"])
    p.add_argument("results", nargs="*", default=None,
                   help="accuracy/fidelity: eval --out folder(s), their records drawn together")
    p.add_argument("--out", default=None, help="PNG path (default: in the first results folder)")
    p.add_argument("--metric", default="kl", choices=["kl", "top1", "ppl_ratio"], help="fidelity: the y axis")
    add_model_args(p)
    p.add_argument("--text", default=None, help="retention/kept: text to run (default: eval-split prose)")
    p.add_argument("--task", default=None, help="retention/kept: run one prompt of this eval task (e.g. passkey) "
                                                 "instead of prose")
    p.add_argument("--depth", type=float, default=0.3, help="retention/kept with --task: where the needle sits (0-1)")
    p.add_argument("--tokens", type=int, default=512, help="retention/kept: tokens of text")
    p.add_argument("--beta", action="store_true", help="retention: mean beta instead of mean log beta")
    p.add_argument("--budget", type=int, default=64, help="kept: tokens per KV head")
    p.add_argument("--policy", default="trimkv", help="kept: eviction policy")
    p.set_defaults(func=_plot)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trimkv.eval")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
