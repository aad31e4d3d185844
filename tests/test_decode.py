"""The compiled decode step (trimkv.serve.decode): token-identical to eager greedy decoding with the same bounded cache
(several budgets, sink / window, a fused and a non-fused policy), one graph for every step (no recompilation after
warm-up), left-padded batches equal to single-row runs, eos handled like generate, what cannot compile refused."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import DEVICE, build_tiny_model, requires_cuda
from trimkv.attach import attach_gates
from trimkv.compat import cache_kwargs
from trimkv.errors import CacheError
from trimkv.serve import CompiledDecoder, fast_generate, make_cache
from trimkv.serve.decode import graphs_compiled

pytestmark = [pytest.mark.usefixtures("one_thread", "fresh_dynamo"), pytest.mark.slow]

PROMPT = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def fresh_dynamo():
    """Graphs of other modules do not count against dynamo's per-function limit here, nor ours against theirs."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def gated_model(eos=None, device="cpu"):
    """A tiny Llama with gates whose log beta is spread out (evictions are decided by real score gaps), eos off."""
    model = build_tiny_model(initializer_range=0.2)
    handle = attach_gates(model, gate_hidden=16, bias_init=1.0, init_std=0.5)
    model.generation_config.eos_token_id = eos
    return model.to(device), handle


def eager_generate(model, ids, cache, n, mask=None, chunk=16):
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **cache_kwargs(model, cache), max_new_tokens=n,
                              do_sample=False, pad_token_id=0, prefill_chunk_size=chunk)


def kept_sets(cache):
    return [[[set(p[p >= 0].tolist()) for p in row] for row in layer.pos] for layer in cache.layers]


@pytest.mark.parametrize("policy,budget,sink,window", [
    ("trimkv", 8, 0, 0),
    ("trimkv", 12, 2, 3),
    ("h2o", 12, 2, 3),          # not fused: needs the attention weights, scores by the generic argmin
    ("random", 12, 2, 3),       # its draws are a hash of the token, computed in the graph
])
def test_compiled_decode_is_token_identical_to_eager(policy, budget, sink, window):
    model, handle = gated_model()
    new = lambda: make_cache(model, policy, budget, sink=sink, window=window)  # noqa: E731
    ref_cache, cache = new(), new()
    ref = eager_generate(model, PROMPT, ref_cache, n=40)
    decoder = CompiledDecoder(model, cache, prefill_chunk=16)
    out = decoder.generate(PROMPT, max_new_tokens=40)
    assert torch.equal(out, ref)
    assert len(set(out[0, 40:].tolist())) > 3                     # a real continuation, not one repeated token
    assert kept_sets(cache) == kept_sets(ref_cache)                # the same tokens were evicted
    assert cache.get_seq_length() == ref_cache.get_seq_length() == 40 + 40 - 1
    assert decoder.last.recompiles == 0 and decoder.last.timed_steps == 37


def test_one_graph_serves_every_step_as_the_context_grows():
    model, _ = gated_model()
    cache = make_cache(model, "trimkv", 8, sink=0, window=0)   # the shapes of the first case above
    decoder = CompiledDecoder(model, cache, prefill_chunk=16)
    decoder.generate(PROMPT, max_new_tokens=4)                     # warm-up: compiles once
    buffers = [layer.keys.data_ptr() for layer in cache.layers] + [decoder._state.ids.data_ptr()]
    before = graphs_compiled()
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = decoder.generate(PROMPT[:, :23], max_new_tokens=96)  # another prompt length, context 23 -> 118
    assert graphs_compiled() == before and decoder.last.recompiles == 0
    assert out.shape == (1, 23 + 96) and decoder.last.timed_steps == 93
    assert [layer.keys.data_ptr() for layer in cache.layers] + [decoder._state.ids.data_ptr()] == buffers  # in place
    assert all(int(layer.num_kept().min()) == 8 for layer in cache.layers)


def left_padded(lengths, seed=4):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in lengths]
    T = max(lengths)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    return prompts, ids, mask


def test_left_padded_batch_equals_single_rows_and_eager():
    """One chunk per prompt (a chunked prefill compacts at chunk ends, which differ between a padded row and a
    single run)."""
    model, _ = gated_model()
    prompts, ids, mask = left_padded((12, 20, 27))
    new = lambda: make_cache(model, "trimkv", 8, sink=0, window=0)  # noqa: E731
    out = fast_generate(model, ids, new(), attention_mask=mask, max_new_tokens=24, prefill_chunk=32)
    assert torch.equal(out, eager_generate(model, ids, new(), n=24, mask=mask, chunk=32))
    for i, p in enumerate(prompts):
        single = fast_generate(model, p[None], new(), max_new_tokens=24, prefill_chunk=32)
        assert torch.equal(out[i, ids.shape[1]:], single[0, len(p):]), f"row {i}"


def test_end_of_sequence_stops_and_pads_like_generate():
    model, _ = gated_model()
    _, ids, mask = left_padded((12, 20, 27), seed=7)
    new = lambda: make_cache(model, "trimkv", 8, sink=0, window=0)  # noqa: E731
    free = fast_generate(model, ids, new(), attention_mask=mask, max_new_tokens=24, prefill_chunk=32)
    eos = int(free[0, ids.shape[1] + 3])                           # row 0 ends at its 4th token
    model.generation_config.eos_token_id = eos
    ref = eager_generate(model, ids, new(), n=24, mask=mask, chunk=32)
    out = fast_generate(model, ids, new(), attention_mask=mask, max_new_tokens=24, prefill_chunk=32)
    assert torch.equal(out, ref)
    assert (ref[0, ids.shape[1] + 4:] == 0).all()                  # row 0 padded after its eos


def test_what_cannot_compile_is_refused_with_the_reason():
    model, handle = gated_model()
    with pytest.raises(CacheError, match="data-dependent"):
        CompiledDecoder(model, make_cache(model, "trimkv", 16, scope="global", sink=0, window=0))
    with pytest.raises(CacheError, match="RetentionCache"):
        CompiledDecoder(model, DynamicCache(config=model.config))
    cache = make_cache(model, "trimkv", 8, sink=0, window=0)
    decoder = CompiledDecoder(model, cache, backend="eager")
    decoder.generate(PROMPT, max_new_tokens=2)
    with pytest.raises(CacheError, match="batch 1, the input has 2 rows"):
        decoder.generate(PROMPT.expand(2, -1), max_new_tokens=2)
    handle.detach()                                                # a heuristic needs no gates: the hooks come back
    decoder = CompiledDecoder(model, make_cache(model, "streaming", 8, sink=0, window=0), backend="eager")
    assert decoder.generate(PROMPT, max_new_tokens=2).shape == (1, 42)


@requires_cuda
def test_cuda_graphs_decode_is_token_identical_and_never_recompiles():
    """On a GPU: mode "reduce-overhead" (CUDA graphs), every tensor on the device."""
    model, _ = gated_model(device=DEVICE)
    ids = PROMPT.to(DEVICE)
    ref = eager_generate(model, ids, make_cache(model, "trimkv", 12, sink=2, window=3), n=40)
    decoder = CompiledDecoder(model, make_cache(model, "trimkv", 12, sink=2, window=3), prefill_chunk=16)
    assert torch.equal(decoder.generate(ids, max_new_tokens=40), ref)
    assert decoder.last.recompiles == 0
    state = decoder._state
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.equal(decoder.generate(ids, max_new_tokens=40), ref)
    assert decoder._state is state                     # the same buffers: the recorded CUDA graph is replayed
