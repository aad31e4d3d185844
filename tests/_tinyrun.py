"""A tiny end-to-end training setup for the engine / resume tests: a 2-layer Llama and a byte-level BPE
tokenizer saved to a folder (so ``load_model`` reads it like a Hub model), a jsonl of prose, and a recipe.
Everything is built offline in a second or two.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch

SENTENCES = [
    "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun",
    "retention gates decide which tokens a bounded cache keeps and which it forgets",
    "a frozen language model is distilled into its own memory bounded self",
    "packing puts several short documents into one long training row",
    "every rank reads its own shard of the batches and the gradients are averaged",
    "checkpoints hold only the trainable state never the frozen base weights",
]


def make_model_dir(folder: Path) -> Path:
    """Save a tiny random Llama + tokenizer to ``folder`` (idempotent)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (folder / "config.json").is_file():
        return folder
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 3, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def make_data(path: Path, n_docs: int = 48) -> Path:
    path.write_text("".join(json.dumps({"text": " ".join(SENTENCES[i % 6: i % 6 + 1 + i % 4])}) + "\n"
                            for i in range(n_docs)))
    return path


def recipe_dict(model_dir: Path, data: Path, run_dir: Path, **train) -> dict:
    """A CPU recipe for the tiny model; ``train`` overrides fields of the train section."""
    return {
        "model": {"name": str(model_dir), "dtype": "float32"},
        "gates": {"gate_hidden": 16, "bias_init": 4.0},
        "data": {"source": str(data), "seq_len": 32, "batch_size": 1, "seed": 0,
                 "cache_dir": str(run_dir.parent / "data-cache")},
        "loss": {"budget": 8, "chunk_size": 16},
        "train": {"steps": 6, "lr": 1e-2, "min_lr": 1e-4, "warmup_steps": 2, "device": "cpu",
                  "attn_impl": "reference", **train},
        "output": {"run_dir": str(run_dir), "checkpoint": str(run_dir / "gates")},
        "logging": {"wandb": "disabled"},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def ddp_worker(rank: int, world_size: int, port: int, recipe: dict) -> None:
    """``torch.multiprocessing.spawn`` target: what torchrun would set up, then ``finetune``."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from trimkv.train.run import finetune
    from trimkv.recipe import parse_recipe

    finetune(parse_recipe(recipe), progress=False)
