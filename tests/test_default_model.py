"""End-to-end checks on the real embedded model (SmolLM2-135M-Instruct), fetched by `make test`.

Skipped when the GGUF is not on disk (e.g. a bare `pytest` without `make model`).
"""
import pytest
import torch

from trimkv import attach_gates, generate
from trimkv.eval.tasks import make_samples, render_prompt, score
from trimkv.base_model import GGUF_NAME, default_model_dir

pytestmark = pytest.mark.skipif(not (default_model_dir() / GGUF_NAME).is_file(),
                                reason="default model not fetched (run `make model`)")


@pytest.fixture(scope="module")
def smollm():
    from trimkv.base_model import load_model

    torch.manual_seed(0)
    return load_model()


def test_gates_at_init_keep_logits(smollm):
    model, tok = smollm
    ids = tok("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(ids).logits
        handle = attach_gates(model)          # paper init: bias 18, beta ~ 1
        try:
            gated = model(ids).logits
        finally:
            handle.detach()
    assert (gated - ref).abs().max().item() < 1e-4


def test_bounded_cache_with_room_matches_full_cache(smollm):
    model, tok = smollm
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name three colours of the rainbow."}],
                                     tokenize=False, add_generation_prompt=True)
    handle = attach_gates(model)
    try:
        full = generate(model, tok, prompt, budget=None, max_new_tokens=16)   # the frozen model's full cache
        bounded = generate(model, tok, prompt, budget=256, sink=0, window=0, prefill_chunk=16, max_new_tokens=16)
    finally:
        handle.detach()
    assert bounded.text == full.text
    assert bounded.kv_bytes < full.kv_bytes * 10  # fixed slot buffers, not a growing cache


def test_passkey_full_cache_and_constant_bounded_memory(smollm):
    model, tok = smollm
    sample = make_samples("passkey", tok, context_length=768, n=1, seed=1, depths=[0.5], chat=False)[0]
    prompt = render_prompt(sample, tok)
    handle = attach_gates(model)
    try:
        full = generate(model, tok, prompt, budget=None, max_new_tokens=12)
        small = generate(model, tok, prompt, budget=64, sink=4, window=16, max_new_tokens=12)
    finally:
        handle.detach()
    assert score(full.text, sample.answers, "all") == 1.0, full.text
    per_token = 30 * 3 * (64 * 2 * 4 + 12)       # layers x KV heads x (K + V fp32 + metadata) per slot
    assert small.kv_bytes == 64 * per_token        # exactly the budget, whatever the prompt length
