"""Shared bits of the benchmarks: argument parsing, model loading, timing, tables and JSON."""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of a few seconds")
    p.add_argument("--model", default=None,
                   help="'smollm2' (default model, via trimkv.base_model.load_model), 'smollm2-shape' (random "
                        "weights of the same shape: speed only, nothing to fetch), 'tiny' (random Llama) or a Hub id / "
                        "folder; default: smollm2, tiny with --quick")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    return p


def add_decode_args(p: argparse.ArgumentParser) -> None:
    """--budget / --steps of the decode-step benchmarks."""
    p.add_argument("--budget", type=int, default=None, help="M tokens per KV head (default 512; 32 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="timed repetitions (default 32)")


def decode_sizes(args) -> tuple[int, int]:
    """(M, timed steps) from :func:`add_decode_args`' options and --quick."""
    return args.budget or (32 if args.quick else 512), args.steps or (5 if args.quick else 32)


def decode_setup(args):
    """What a decode-step benchmark starts from: (M, timed steps, model, config, weight dtype)."""
    setup(args)
    M, steps = decode_sizes(args)
    model, cfg = load(args)
    return M, steps, model, cfg, next(model.parameters()).dtype


def setup(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def load(args):
    """(model, config) on args.device in fp32 (bf16 on GPU), eval mode."""
    name = args.model or ("tiny" if args.quick else "smollm2")
    if name in RANDOM_SHAPES:
        from transformers import AutoModelForCausalLM, LlamaConfig

        model = AutoModelForCausalLM.from_config(LlamaConfig(**RANDOM_SHAPES[name], max_position_embeddings=1 << 16))
        if args.device.startswith("cuda"):
            model = model.to(torch.bfloat16)
    else:
        from trimkv.base_model import load_model

        model, _ = load_model(name, dtype="bfloat16" if args.device == "cuda" else "float32")
    model = model.to(args.device).eval()
    return model, model.config


# Random-weight Llamas: "tiny" for smoke runs, "smollm2-shape" = SmolLM2-135M's shape (30 layers, 9 heads, 3 KV heads).
RANDOM_SHAPES = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
    "smollm2-shape": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                          rope_theta=100000.0),
}


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], *, repeat: int, warmup: int = 1, device="cpu") -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def table(rows: list[dict], title: str) -> str:
    """A plain aligned text table of ``rows`` (same keys in every row)."""
    if not rows:
        return f"{title}\n(no rows)"
    cols = list(rows[0])
    cells = [[_fmt(r[c]) for c in cols] for r in rows]
    w = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.rjust(w[i]) for i, c in enumerate(cols))
    out = [title, line, "-" * len(line)]
    out += ["  ".join(v.rjust(w[i]) for i, v in enumerate(row)) for row in cells]
    return "\n".join(out)


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.0f}"
    return str(x)


def finish(args, name: str, rows: list[dict], title: str, extra: dict | None = None) -> dict:
    print(table(rows, title))
    if extra:
        for k, v in extra.items():
            print(f"{k}: {_fmt(v)}")
    result = {"benchmark": name, "rows": rows, **(extra or {}), "env": env(args)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def env(args) -> dict:
    return {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": sys.version.split()[0], "machine": platform.machine(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def random_model_dir(folder: Path, shape: str = "tiny", *, vocab: int = 512) -> Path:
    """A random-weight Llama of ``RANDOM_SHAPES[shape]`` and a byte-level BPE tokenizer (``vocab`` tokens, trained
    on the built-in prose in a second) saved to ``folder``, so that a recipe loads it like a Hub model: training runs
    that need a model and a tokenizer but not the default model's weights (the DeepSpeed check, dry runs). The
    model's vocabulary is the larger of the shape's and the tokenizer's. Idempotent."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from trimkv.data import corpus

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus.prose_documents("train")[:200], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>")
    dims = {**RANDOM_SHAPES[shape]}
    dims["vocab_size"] = max(dims["vocab_size"], len(tok))
    cfg = LlamaConfig(**dims, max_position_embeddings=1 << 16, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
