"""The memory-bounded RetentionCache: equal to the full cache when nothing is evicted, exactly the top-M tokens
by retention score after prefill and during decode (brute force), bounded and allocation-free, batch = single."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import build_tiny_model
from trimkv.attach import attach_gates
from trimkv.compat import cache_kwargs
from trimkv.errors import CacheError
from trimkv.serve import RetentionCache, SoftRetentionCache, make_cache
from trimkv.serve.policies import RetentionPolicy
from trimkv.serve.policies.retention import lookahead_score, retention_score

GEN = torch.Generator().manual_seed(1)
PROMPT = torch.randint(3, 128, (1, 40), generator=GEN)


def gated_model(family="llama", **gate_kw):
    model = build_tiny_model(family, initializer_range=0.2)   # larger weights: less degenerate greedy output
    handle = attach_gates(model, gate_hidden=16, **gate_kw)
    return model, handle


def generate(model, ids, cache, mask=None, n=10, **kw):
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(ids, attention_mask=mask, **cache_kwargs(model, cache), max_new_tokens=n, do_sample=False,
                          pad_token_id=0, return_dict_in_generate=True, output_logits=True, **kw)


class GateLog:
    """Forward hooks on the gates: every log beta [B, Hkv, T] each layer produced, in call order."""

    def __init__(self, handle):
        self.out = {i: [] for i in range(len(handle.gates))}
        self.hooks = [g.register_forward_hook(self._hook(i)) for i, g in enumerate(handle.gates.layers)]

    def _hook(self, idx):
        def hook(module, args, output):
            self.out[idx].append(output.detach().clone())
        return hook

    def remove(self):
        for h in self.hooks:
            h.remove()


def kept_sets(cache) -> list[list[list[set[int]]]]:
    """[layer][row][head] -> set of kept positions."""
    return [[[set(p[p >= 0].tolist()) for p in row] for row in layer.pos] for layer in cache.layers]


# --------------------------------------------------------------------------------------- no eviction


@pytest.mark.parametrize("chunk", [None, 16])
@pytest.mark.parametrize("family,gate_type", [("llama", "rg"), ("qwen3", "rg"), ("llama", "rg2")])
def test_big_budget_generates_like_the_full_cache(family, gate_type, chunk):
    model, _ = gated_model(family, gate_type=gate_type)
    ref = generate(model, PROMPT, SoftRetentionCache(2))                # the full cache of the gated model
    cache = make_cache(model, "trimkv", 64, sink=0, window=0)
    sizes = []
    layer0 = cache.layers[0]
    update = layer0.update
    layer0.update = lambda k, v, *a, **kw: (sizes.append(k.shape[2]), update(k, v, *a, **kw))[1]
    out = generate(model, PROMPT, cache, prefill_chunk_size=chunk)
    assert sizes[: (1 if chunk is None else 3)] == ([40] if chunk is None else [16, 16, 8])  # really chunked
    assert torch.equal(out.sequences, ref.sequences)
    assert len(set(out.sequences[0, 40:].tolist())) > 1
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert cache.get_seq_length() == 40 + 10 - 1      # the last sampled token is never fed back


@pytest.mark.parametrize("gate_type", ["rg", "rg2", "rg2-all", "rg3"])
def test_full_cache_with_soft_gates_matches_recomputing(gate_type):
    """generate() with a SoftRetentionCache and strongly decaying gates = the gated model run on the whole sequence."""
    model, handle = gated_model(gate_type=gate_type, bias_init=1.0)
    out = generate(model, PROMPT[:, :20], SoftRetentionCache(2), n=4)
    with torch.no_grad():
        for step, step_logits in enumerate(out.logits):
            full = model(input_ids=out.sequences[:, : 20 + step], use_cache=False).logits[:, -1]
            torch.testing.assert_close(step_logits, full, atol=1e-4, rtol=0)
            with handle.disabled():
                plain = model(input_ids=out.sequences[:, : 20 + step], use_cache=False).logits[:, -1]
            assert not torch.allclose(full, plain, atol=1e-3)          # the gates really act


def test_full_cache_log_beta_history_follows_a_beam_reorder():
    """Beam search reorders a soft-gated cache between steps; the gates' log-beta history must move with its rows."""
    model, _ = gated_model(bias_init=1.0)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    nxt = torch.randint(3, 128, (2, 1), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        plain = SoftRetentionCache(2)
        model(input_ids=ids, **cache_kwargs(model, plain), use_cache=True)
        want = model(input_ids=nxt[[1, 1]], **cache_kwargs(model, plain), use_cache=True).logits   # no reorder: row 1
        beams = SoftRetentionCache(2)
        model(input_ids=ids, **cache_kwargs(model, beams), use_cache=True)
        beams.reorder_cache(torch.tensor([1, 1]))          # both beams continue row 1, as generate() would
        got = model(input_ids=nxt[[1, 1]], **cache_kwargs(model, beams), use_cache=True).logits
    torch.testing.assert_close(got[0], want[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)


def test_full_cache_filled_without_gates_is_refused():
    model, handle = gated_model(bias_init=1.0)
    plain = DynamicCache(config=model.config)          # the frozen model's full cache, continued with the gates on
    with torch.no_grad():
        with handle.disabled():
            model(input_ids=PROMPT[:, :10], **cache_kwargs(model, plain), use_cache=True)
        with pytest.raises(CacheError, match="log retention"):
            model(input_ids=PROMPT[:, 10:11], **cache_kwargs(model, plain), use_cache=True)
        soft = SoftRetentionCache(2)                    # the soft-gated cache needs the gates from its first token on
        with handle.disabled(), pytest.raises(CacheError, match="gated model"):
            model(input_ids=PROMPT[:, :10], **cache_kwargs(model, soft), use_cache=True)


# ------------------------------------------------------------------------------------ prefill top-M


def keep_score(t: int, pos: torch.Tensor, logb: torch.Tensor, lookahead: int = 0) -> torch.Tensor:
    """The score a cache ranks kept tokens by: retention (t - pos) log beta, or the look-ahead future utility."""
    t_now = torch.tensor([t])
    if lookahead:
        return lookahead_score(pos[None], logb[None], t_now, lookahead)[0]
    return retention_score(pos[None], logb[None], t_now)[0]


def topk_positions(logb: torch.Tensor, t: int, budget: int, sink: int, window: int, lookahead: int = 0) -> set[int]:
    """Brute force: the positions a cache of ``budget`` slots keeps at step t, given log beta [T] of positions 0..t."""
    pos = torch.arange(logb.numel())
    protected = {i for i in pos.tolist() if i < sink or i > t - window}
    score = keep_score(t, pos, logb, lookahead)
    rest = sorted((i for i in pos.tolist() if i not in protected), key=lambda i: -score[i].item())
    return protected | set(rest[: budget - len(protected)])


@pytest.mark.parametrize("sink,window,lookahead", [(0, 0, 0), (2, 0, 0), (0, 3, 0), (2, 3, 0), (0, 0, 16), (2, 3, 4)])
def test_prefill_keeps_exactly_the_top_m_by_score(sink, window, lookahead):
    model, handle = gated_model(bias_init=1.0, init_std=0.5)       # log beta spread out: no ties
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(2))
    budget = 9
    cache = make_cache(model, RetentionPolicy(lookahead), budget, sink=sink, window=window)
    log = GateLog(handle)
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
    log.remove()
    kept = kept_sets(cache)
    for layer, outs in log.out.items():
        (logb,) = outs                                                # one forward, one chunk: [B, Hkv, T]
        for b in range(2):
            for h in range(2):
                want = topk_positions(logb[b, h], 29, budget, sink, window, lookahead)
                assert kept[layer][b][h] == want, (layer, b, h)
    assert cache.get_seq_length() == 30


# ------------------------------------------------------------------------------------- decode greedy


@pytest.mark.parametrize("lookahead", [0, 8])
def test_decode_matches_greedy_eviction_and_never_reallocates(lookahead):
    """The newcomer enters; the victim is the lowest-scoring kept token (retention or look-ahead score)."""
    model, handle = gated_model(bias_init=1.0, init_std=0.5)
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    budget, B, H = 6, 2, 2
    cache = make_cache(model, RetentionPolicy(lookahead), budget, sink=0, window=0)
    log = GateLog(handle)
    sim = [[[{} for _ in range(H)] for _ in range(B)] for _ in cache.layers]   # pos -> logb
    ptrs = None
    with torch.no_grad():
        for t in range(ids.shape[1]):
            model(input_ids=ids[:, t: t + 1], **cache_kwargs(model, cache), use_cache=True)
            for layer in range(len(cache.layers)):
                logb = log.out[layer][-1]                                     # [B, Hkv, 1]
                for b in range(B):
                    for h in range(H):
                        kept = sim[layer][b][h]
                        if len(kept) == budget:                               # fp32 scores, as the cache
                            old = torch.tensor(list(kept))
                            score = keep_score(t, old, torch.stack(list(kept.values())), lookahead)
                            del kept[int(old[score.argmin()])]
                        kept[t] = logb[b, h, 0]
            assert kept_sets(cache) == [[[set(s) for s in row] for row in layer] for layer in sim], f"step {t}"
            for layer in cache.layers:
                assert int(layer.num_kept().max()) <= budget
                assert layer.keys.shape[2] == budget
            now = [(l.keys.data_ptr(), l.values.data_ptr(), l.pos.data_ptr(), l.state.data_ptr()) for l in cache.layers]
            assert ptrs is None or now == ptrs, f"buffers re-allocated at step {t}"
            ptrs = now
    log.remove()
    assert all(int(layer.num_kept().min()) == budget for layer in cache.layers)
    assert cache.get_seq_length() == ids.shape[1]


# -------------------------------------------------------------------------------------------- batch


def cache_for(model, budget):
    if budget is None:                                               # the full cache, soft-gated attention
        return SoftRetentionCache(2)
    return make_cache(model, "trimkv", budget, sink=1, window=2)


@pytest.mark.parametrize("budget", [8, 64, None])
def test_left_padded_batch_equals_single_runs(budget):
    model, _ = gated_model(bias_init=4.0, init_std=0.3)
    lengths, T = (12, 20, 27), 27
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in lengths]
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    batch = generate(model, ids, cache_for(model, budget), mask=mask)
    for i, p in enumerate(prompts):
        single = generate(model, p[None], cache_for(model, budget))
        assert torch.equal(batch.sequences[i, T:], single.sequences[0, len(p):]), f"row {i}"


# --------------------------------------------------------------------------------------- accounting


def test_seq_length_is_logical_and_memory_is_constant():
    model, _ = gated_model()
    cache = make_cache(model, "trimkv", 8, sink=0, window=0)
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0
    with torch.no_grad():
        model(input_ids=PROMPT[:, :20], **cache_kwargs(model, cache), use_cache=True)
        assert cache.get_seq_length() == 20
        full = cache.nbytes()
        # 2 layers x B=1 x Hkv=2 x C=8 slots x (K + V: 2 x 16 fp32, pos int64, logb fp32)
        assert full == 2 * 1 * 2 * 8 * (2 * 16 * 4 + 8 + 4)
        for t in range(20, 30):
            model(input_ids=PROMPT[:, t: t + 1], **cache_kwargs(model, cache), use_cache=True)
            assert cache.nbytes() == full
    assert cache.get_seq_length() == 30
    assert all(int(layer.num_kept().max()) == 8 for layer in cache.layers)


def test_budget_must_exceed_sink_plus_window():
    with pytest.raises(ValueError, match="budget=6"):
        RetentionCache(6, 2, sink=2, window=4)
    with pytest.raises(ValueError, match="budget"):
        RetentionCache(0, 2)
    RetentionCache(7, 2, sink=2, window=4)


def test_each_layer_allocates_on_its_key_states_device():
    """The slot buffers are allocated lazily from the first key states a layer sees, so a model split over devices
    keeps each layer's cache beside its layer (the meta device stands in for a second device)."""
    cache = RetentionCache(8, 2, sink=1, window=2)
    k = torch.zeros(1, 2, 3, 16, device="meta")
    cache.layers[1].lazy_initialization(k, k)
    layer = cache.layers[1]
    assert {t.device.type for t in (layer.keys, layer.values, layer.pos, layer.state, layer.t_now)} == {"meta"}
    assert not cache.layers[0].is_initialized
