"""KVP rankers (trimkv.kvp) and the ``kvp`` policy: the all-budget cost by hand, its closed-form expectation against
sampled rankings, a planted utility recovered per head, save / load / push round trip, bad checkpoints refused, the
policy inside model.generate (the kept set is the rankers' top, eager and batched, compiled decode token-identical),
training from a store resumed after a stop, the command line."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from _cli import assert_fails, run_cli
from conftest import build_tiny_model
from trimkv.compat import cache_kwargs
from trimkv.errors import (CacheError, CheckpointNotFoundError, CorruptCheckpointError, GateMismatchError,
                           NonFiniteError, ResumeError)
from trimkv.kvp import KVPConfig, KVPRankers, load_rankers, push_rankers, save_rankers, train_rankers
from trimkv.kvp.objective import (expected_cost, expected_loss, normalized_cost, optimal_cost, order_by,
                                  ranking_cost, rloo_loss)
from trimkv.kvp.run import train_from_store
from trimkv.serve import make_cache
from trimkv.serve.policies import KVPPolicy
from trimkv.trace import LayerTrace

# ------------------------------------------------------------------------------------------- the objective


def test_all_budget_cost_by_hand():
    u = torch.tensor([3.0, 1.0, 2.0])
    m = torch.ones(3, dtype=torch.bool)
    # budgets 1 and 2: order (0, 2, 1) loses {2, 1} then {1}: 3 + 1 = 4; order (1, 2, 0) loses 2+3 then 3 = 8
    assert ranking_cost(torch.tensor([0, 2, 1]), u, m) == 4.0
    assert ranking_cost(torch.tensor([1, 2, 0]), u, m) == 8.0
    assert optimal_cost(u, m) == 4.0
    assert normalized_cost(torch.tensor([0.0, 5.0, 1.0]), u, m) == 2.0          # scores order (1, 2, 0)
    # a masked token is neither ranked nor counted, whatever its score
    m2 = torch.tensor([True, True, False])
    assert ranking_cost(order_by(torch.tensor([0.0, 1.0, 9.0]), m2), u, m2) == 3.0   # (1, 0): loses 3 at b = 1


def test_expected_cost_is_the_mean_over_gumbel_sorted_rankings():
    g = torch.Generator().manual_seed(0)
    s, u = torch.randn(2, 7, generator=g), torch.rand(2, 7, generator=g)
    m = torch.ones(2, 7, dtype=torch.bool)
    m[1, 5:] = False
    K = 40000
    gumbel = -torch.log(-torch.log(torch.rand(K, 2, 7, generator=g).clamp(1e-20, 1 - 1e-7)))
    sampled = ranking_cost(order_by(s + gumbel, m.expand(K, 2, 7)), u.expand(K, 2, 7), m.expand(K, 2, 7)).mean(0)
    torch.testing.assert_close(sampled, expected_cost(s, u, m), rtol=0.02, atol=0.0)


def test_rloo_gradient_points_like_the_expected_gradient():
    g = torch.Generator().manual_seed(1)
    u, m = torch.rand(4, 12, generator=g), torch.ones(4, 12, dtype=torch.bool)
    s1 = torch.zeros(4, 12, requires_grad=True)
    expected_loss(s1, u, m).backward()
    s2 = torch.zeros(4, 12, requires_grad=True)
    rloo_loss(s2, u, m, samples=512, generator=g).backward()
    cos = torch.nn.functional.cosine_similarity(s1.grad.flatten(), s2.grad.flatten(), dim=0)
    assert cos > 0.8                      # both lower the cost: push high-utility tokens up
    assert torch.corrcoef(torch.stack([-s1.grad.flatten(), u.flatten()]))[0, 1] > 0.9


# ------------------------------------------------------------------------------------ planted utility


def planted_trace(layer: int, R: int = 32, H: int = 2, T: int = 96, D: int = 8, seed: int = 0) -> LayerTrace:
    """Head 0's utility grows with key feature 0, head 1's with minus value feature 1 (the rest is noise)."""
    g = torch.Generator().manual_seed(seed + 100 * layer)
    k, v = torch.randn(R, H, T, D, generator=g), torch.randn(R, H, T, D, generator=g)
    u = torch.stack([torch.relu(k[:, 0, :, 0]) ** 2, torch.relu(-v[:, 1, :, 1]) ** 2], 1)
    return LayerTrace(layer, k, v, torch.arange(T).expand(R, T).clone(), torch.ones(R, T, dtype=torch.bool),
                      {"future": u})


CFG = KVPConfig(num_layers=2, num_kv_heads=2, head_dim=8, hidden=16, pos_scale=96)


@pytest.mark.parametrize("objective,steps,bound", [("expected", 200, 1.35), ("rloo", 200, 1.6)])
def test_trained_order_recovers_the_planted_utility(objective, steps, bound):
    metrics = []
    rankers = train_rankers(planted_trace, CFG, steps=steps, rows=8, tokens=64, objective=objective, min_cache=32,
                            sink=0, window=0, progress=False, on_layer=lambda l, r, m: metrics.append(m))
    fresh = planted_trace(0, R=16, seed=7)
    with torch.no_grad():
        s = rankers.score(0, fresh.keys, fresh.values, fresh.pos[:, None].expand(-1, 2, -1))
    u, m = fresh.target(), torch.ones_like(fresh.target(), dtype=torch.bool)
    learned = normalized_cost(s, u, m).mean(0)                                   # [H]: 1 = the best order
    random = normalized_cost(torch.randn(u.shape, generator=torch.Generator().manual_seed(3)), u, m).mean(0)
    assert (learned < bound).all() and (random > 3).all(), (learned, random)
    # each head learned its own rule: swap the heads' features and the order breaks
    with torch.no_grad():
        swapped = rankers.score(0, fresh.keys.flip(1), fresh.values.flip(1), fresh.pos[:, None].expand(-1, 2, -1))
    assert (normalized_cost(swapped, u.flip(1), m).mean(0) > 2 * learned).all()
    assert [m["layer"] for m in metrics] == [0, 1] and all(m["val_cost_kvp"] < m["val_cost_random"] for m in metrics)


def test_time_limit_stops_each_layer():
    metrics = []
    train_rankers(planted_trace, CFG, steps=10**6, rows=2, tokens=16, min_cache=8, time_limit=0.5, progress=False,
                  on_layer=lambda l, r, m: metrics.append(m))
    assert len(metrics) == 2 and all(0 < m["steps"] < 10**6 for m in metrics)


# ------------------------------------------------------------------------------------------- checkpoints


def trained(seed=0) -> KVPRankers:
    r = KVPRankers(KVPConfig(num_layers=2, num_kv_heads=2, head_dim=16, hidden=8, pos_scale=64,
                             base_model="tiny-llama"), seed=seed)
    with torch.no_grad():
        r.b2.normal_()
    return r


def test_save_load_push_round_trip(tmp_path):
    r = trained()
    path = save_rankers(r, tmp_path / "ckpt", metadata={"note": "test"})
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((path / "config.json").read_text())
    assert config["kind"] == "trimkv-kvp" and config["base_model"] == "tiny-llama" and config["hidden"] == 8
    assert "tiny-llama" in (path / "README.md").read_text() and "--kvp" in (path / "README.md").read_text()
    back = load_rankers(path)
    assert back.fingerprint() == r.fingerprint()
    k, v = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    pos = torch.arange(5).expand(2, 2, 5)
    torch.testing.assert_close(back.score(1, k, v, pos), r.score(1, k, v, pos))

    class FolderHub:      # what push_rankers asks of huggingface_hub.HfApi, writing to a local folder
        def create_repo(self, repo_id, **kw):
            return repo_id

        def upload_folder(self, *, repo_id, folder_path, allow_patterns, **kw):
            dest = tmp_path / "hub" / repo_id
            shutil.copytree(folder_path, dest, ignore=lambda d, names: [n for n in names if n not in allow_patterns])
            return f"file://{dest}"

    url = push_rankers(path, "user/kvp", api=FolderHub())
    assert load_rankers(url.removeprefix("file://")).fingerprint() == r.fingerprint()


def test_bad_checkpoints_are_refused(tmp_path):
    path = save_rankers(trained(), tmp_path / "ok")
    with pytest.raises(CheckpointNotFoundError):
        load_rankers(tmp_path / "nowhere")
    missing = shutil.copytree(path, tmp_path / "missing")
    (missing / "model.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match="model.safetensors"):
        load_rankers(missing)
    shape = shutil.copytree(path, tmp_path / "shape")
    cfg = json.loads((shape / "config.json").read_text())
    (shape / "config.json").write_text(json.dumps({**cfg, "hidden": 9}))
    with pytest.raises(CorruptCheckpointError, match="w1.*shape"):
        load_rankers(shape)
    nan = shutil.copytree(path, tmp_path / "nan")
    t = load_file(str(nan / "model.safetensors"))
    t["w2"][0, 0, 0] = float("nan")
    save_file(t, str(nan / "model.safetensors"))
    with pytest.raises(CorruptCheckpointError, match="NaN"):
        load_rankers(nan)
    gates = shutil.copytree(path, tmp_path / "gates")
    (gates / "config.json").write_text(json.dumps({"num_layers": 2, "format_version": 1}))
    with pytest.raises(CorruptCheckpointError, match="not a KVP"):
        load_rankers(gates)
    with pytest.raises(GateMismatchError, match="this model has 3 x 2"):
        load_rankers(path, build_tiny_model(num_hidden_layers=3))
    bad = trained()
    with torch.no_grad():
        bad.b1[0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError):
        save_rankers(bad, tmp_path / "inf")
    assert not (tmp_path / "inf").exists()


# ------------------------------------------------------------------------------------------- the policy


PROMPT = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(1))


def test_prefill_keeps_the_rankers_top_tokens():
    model = build_tiny_model(initializer_range=0.2)
    r = trained()
    with torch.no_grad():
        full = DynamicCache(config=model.config)
        model(PROMPT, **cache_kwargs(model, full), use_cache=True)
        cache = make_cache(model, KVPPolicy(r), 12, sink=2, window=3)
        model(PROMPT, **cache_kwargs(model, cache), use_cache=True)
    for l, layer in enumerate(cache.layers):
        k, v = full.layers[l].keys, full.layers[l].values                       # [1, Hkv, 40, D] post-RoPE
        s = r.score(l, k, v, torch.arange(40).expand(1, 2, 40))[0]             # [Hkv, 40]
        for h in range(2):
            rest = s[h, 2:37].topk(12 - 5).indices + 2
            assert set(layer.pos[0, h].tolist()) == {0, 1, 37, 38, 39, *rest.tolist()}, (l, h)


def test_policy_in_generate_eager_and_batched():
    model = build_tiny_model(initializer_range=0.2)
    r = trained()

    def run(ids, mask):
        cache = make_cache(model, KVPPolicy(r), 12, sink=2, window=3)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, **cache_kwargs(model, cache), max_new_tokens=8,
                                 do_sample=False, pad_token_id=0, prefill_chunk_size=64)
        return out, cache

    out, cache = run(PROMPT, torch.ones_like(PROMPT))
    assert out.shape[1] == 48
    for layer in cache.layers:
        assert (layer.num_kept() == 12).all() and (layer.pos[0].max(-1).values == 46).all()
    short = PROMPT[:, 10:]
    ids = torch.cat([torch.cat([torch.zeros(1, 10, dtype=torch.long), short], 1), PROMPT])   # left-padded row 0
    mask = (ids != 0).long()
    mask[1] = 1
    both, _ = run(ids, mask)
    alone, _ = run(short, torch.ones_like(short))
    assert torch.equal(both[1, 40:], out[0, 40:])
    assert torch.equal(both[0, 40:], alone[0, 30:])


@pytest.mark.slow
def test_compiled_decode_is_token_identical_to_eager():
    from trimkv.serve import CompiledDecoder

    torch._dynamo.reset()
    model = build_tiny_model(initializer_range=0.2)
    r = trained()
    model.generation_config.eos_token_id = None
    ref_cache, cache = (make_cache(model, KVPPolicy(r), 12, sink=2, window=3) for _ in range(2))
    with torch.no_grad():
        ref = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), **cache_kwargs(model, ref_cache),
                             max_new_tokens=20, do_sample=False, pad_token_id=0, prefill_chunk_size=16)
    out = CompiledDecoder(model, cache, prefill_chunk=16).generate(PROMPT, max_new_tokens=20)
    assert torch.equal(out, ref)
    assert [l.pos.tolist() for l in cache.layers] == [l.pos.tolist() for l in ref_cache.layers]
    torch._dynamo.reset()


def test_kvp_without_rankers_is_refused_clearly():
    with pytest.raises(CacheError, match="--kvp"):
        make_cache(build_tiny_model(), "kvp", 16)
    with pytest.raises(CacheError, match="per \\(layer, KV head\\)|global"):
        make_cache(build_tiny_model(), KVPPolicy(trained()), 16, scope="global")


# ------------------------------------------------------------------------------------- store -> checkpoint


class FakeStore:
    """What train_from_store reads of a trace store: layer(l), num_layers, manifest; ``stop_at`` interrupts once."""

    def __init__(self, stop_at=None):
        self.num_layers, self.stop_at = 2, stop_at
        self.manifest = {"model": {"name": "tiny-llama"}, "seq_len": 48,
                         "shapes": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8}}

    def layer(self, l, rows=None):
        if l == self.stop_at:
            self.stop_at = None
            raise KeyboardInterrupt
        return planted_trace(l, R=8, T=48)


def test_train_from_store_resumes_after_a_stop(tmp_path):
    out = tmp_path / "kvp"
    opts = dict(hidden=8, steps=20, rows=2, tokens=16, sink=0, window=0, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_from_store(FakeStore(stop_at=1), out, **opts)
    partial = tmp_path / "kvp.partial"
    assert json.loads((partial / "progress.json").read_text())["done"] == [0]
    first = load_file(str(partial / "model.safetensors"))["w1"][0]
    with pytest.raises(ResumeError, match="--resume"):
        train_from_store(FakeStore(), out, **opts)
    train_from_store(FakeStore(), out, resume=True, **opts)
    r = load_rankers(out)
    assert torch.equal(r.w1[0], first) and not partial.exists()
    assert r.config.base_model == "tiny-llama" and r.config.pos_scale == 48
    assert "mean_val_cost_kvp" in r.config.extra


def test_store_folder_to_rankers_to_generate(tmp_path):
    """The end-to-end path: a real (tiny) trace store written from a model -> `trimkv kvp train` -> the kvp policy."""
    from _tinyrun import make_model_dir
    from trimkv.base_model import load_model
    from trimkv.data import DataConfig
    from trimkv.trace import TraceSettings
    from trimkv.trace.collect import write_traces

    folder = make_model_dir(tmp_path / "model")
    rows = [{"prompt": f"the quick brown fox {i} jumps over the lazy dog", "completion": f" in the sun {i}"}
            for i in range(6)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tok = load_model(str(folder), dtype="float32")
    cfg = DataConfig(source=str(tmp_path / "qa.jsonl"), seq_len=48, pack=False, cache_dir=str(tmp_path / "cache"))
    write_traces(model, tok, cfg, tmp_path / "store", TraceSettings(rows=6, shard_rows=4), model_name="tiny",
                 progress=False, say=lambda *_: None)
    res = run_cli("kvp", "train", "--store", tmp_path / "store", "--out", tmp_path / "ckpt", "--steps", "5",
                  "--rows", "2", "--tokens", "16", "--hidden", "8", "--sink", "1", "--window", "2", "--quiet")
    assert res.returncode == 0, res.stderr
    r = load_rankers(tmp_path / "ckpt", model)
    assert r.config.base_model == "tiny" and r.config.pos_scale == 48 and r.config.extra["store"] == "store"
    cache = make_cache(model, KVPPolicy(r), 8, sink=1, window=2)
    ids = tok("the quick brown fox jumps over the lazy dog and the cat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), max_new_tokens=4,
                             do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 4 and all((layer.num_kept() == 8).all() for layer in cache.layers)


# --------------------------------------------------------------------------------------- command line


def test_cli_refusals(tmp_path):
    assert_fails(run_cli("eval", "--policies", "kvp", "--n", "1", "--out", tmp_path / "e"), 2, "--kvp")
    assert_fails(run_cli("eval", "--policies", "streaming", "--kvp", tmp_path, "--out", tmp_path / "e"), 2, "kvp")
    assert_fails(run_cli("eval", "--policies", "kvp", "--kvp", tmp_path / "none", "--out", tmp_path / "e"), 6, "none")
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello")
    assert_fails(run_cli("generate", prompts, "--policy", "kvp", "--budget", "32"), 2, "--kvp")
    assert_fails(run_cli("kvp", "train", "--store", tmp_path / "nostore", "--out", tmp_path / "o"), 2, "--store")
    res = run_cli("kvp", "train", "--help")
    assert res.returncode == 0 and "--time-limit" in res.stdout
