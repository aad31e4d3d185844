"""trimkv in transformers' vocabulary: cache_implementation="trimkv" (generate, GenerationConfig, pipelines), the
registered "trimkv-text-generation" pipeline, and PEFT-style from_pretrained / save_pretrained / push_to_hub on the
gates."""
from __future__ import annotations

import pytest
import torch
import transformers
from transformers import GenerationConfig

from conftest import build_tiny_model
from trimkv import PretrainedGates, attach_gates, load_gate_checkpoint, make_cache, register_with_transformers
from trimkv.compat import cache_kwargs
from trimkv.errors import CacheError, GateMismatchError
from trimkv.gate import GateConfig
from trimkv.serve import answer
from trimkv.serve.hf import PIPELINE_TASK

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = "The grass is green. The sky is blue. " * 5 + "The pass key is 71432. " + "Here we go again. " * 5


@pytest.fixture
def gated(tokenizer):
    model = build_tiny_model("llama", vocab_size=len(tokenizer))
    gates = PretrainedGates(GateConfig.for_model(model.config, gate_hidden=8, train_budget=12))
    handle = attach_gates(model, gates)
    with torch.no_grad():                                  # gates that really forget: bias 2 -> beta ~ 0.88
        for gate in handle.gates.layers:
            gate.bias.fill_(2.0)
    register_with_transformers()
    return model


def _generate(model, ids, **kwargs):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                          pad_token_id=0, **kwargs)


@pytest.mark.parametrize("cache_config", [{"policy": "streaming", "budget": 8, "sink": 2, "window": 2},
                                          {"budget": 10, "sink": 2, "window": 2}, {"sink": 2, "window": 2}])
def test_cache_implementation_builds_the_cache_make_cache_builds(gated, tokenizer, cache_config):
    """The name, the cache_config and a GenerationConfig give the tokens of an explicitly passed make_cache cache
    (no cache_config budget: the gates' training budget)."""
    ids = tokenizer(CONTEXT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    expected = {"policy": "trimkv", "budget": 12, **cache_config}
    cache = make_cache(gated, **expected)
    with torch.no_grad():
        ref = _generate(gated, ids, **cache_kwargs(gated, cache))
        by_name = _generate(gated, ids, cache_implementation="trimkv", cache_config=cache_config)
        config = GenerationConfig(cache_implementation="trimkv", cache_config=cache_config, max_new_tokens=6,
                                  do_sample=False, pad_token_id=0)
        by_config = gated.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    assert cache.get_seq_length() > cache.budget                # the reference really evicted
    assert torch.equal(by_name, ref) and torch.equal(by_config, ref)


def test_generation_config_with_trimkv_round_trips(tmp_path):
    register_with_transformers()
    register_with_transformers()                                # idempotent
    GenerationConfig(cache_implementation="trimkv", cache_config={"budget": 64}).save_pretrained(tmp_path)
    loaded = GenerationConfig.from_pretrained(tmp_path)
    assert loaded.cache_implementation == "trimkv" and loaded.cache_config == {"budget": 64}
    assert GenerationConfig(cache_implementation="static").cache_implementation == "static"   # others unchanged


def test_cache_implementation_errors_name_the_fix(gated, tokenizer):
    ids = tokenizer("hello there", return_tensors="pt", add_special_tokens=False)["input_ids"]
    with pytest.raises(CacheError, match="make_cache does not take"):
        _generate(gated, ids, cache_implementation="trimkv", cache_config={"budjet": 8})
    bare = build_tiny_model("llama", vocab_size=len(tokenizer))
    with pytest.raises(CacheError, match="needs a budget"):
        _generate(bare, ids, cache_implementation="trimkv")


def test_registered_pipeline_answers_like_answer(gated, tokenizer):
    pipe = transformers.pipeline(PIPELINE_TASK, model=gated, tokenizer=tokenizer)
    opts = dict(budget=10, sink=2, window=2, max_new_tokens=5)
    one = pipe(CONTEXT, question="What is the pass key?", **opts)
    many = pipe(CONTEXT, questions=["What is the pass key?", "What color is the sky?"], **opts)
    ref = answer(gated, tokenizer, CONTEXT, ["What is the pass key?", "What color is the sky?"], **opts)
    assert one["answer"] == ref.answers[0] and many["answers"] == ref.answers
    assert one["kv_bytes"] == ref.kv_bytes and one["context_tokens"] == ref.context_tokens
    with pytest.raises(CacheError, match="options are"):
        pipe(CONTEXT, question="?", budjet=3)


def test_gates_save_pretrained_from_pretrained_push_to_hub(gated, tmp_path, tokenizer, fake_hub):
    gates = gated.trimkv.gates
    out = gates.save_pretrained(tmp_path / "g", metadata={"steps": 1})
    loaded = PretrainedGates.from_pretrained(out)
    assert isinstance(loaded, PretrainedGates) and isinstance(load_gate_checkpoint(out), PretrainedGates)
    assert all(torch.equal(loaded.state_dict()[k], v.cpu()) for k, v in gates.state_dict().items())
    assert gates.fingerprint() == loaded.fingerprint()
    url = gates.push_to_hub("user/tiny-gates")
    assert "user/tiny-gates" in url and "load_gates(model, 'user/tiny-gates')" in fake_hub.uploads[-1]["card"]
    other = build_tiny_model("llama", vocab_size=len(tokenizer))
    handle = loaded.attach(other)
    assert other.trimkv is handle and handle.gates is loaded
    with pytest.raises(GateMismatchError, match="layers"):
        loaded.attach(build_tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=3))


def test_lr_schedule_is_transformers_cosine_with_another_warmup():
    """Why trimkv keeps its own schedule (trimkv.train.optim.lr_lambda): after warm-up it is transformers' cosine
    with a floor, value for value; the warm-up is not (transformers starts at lr 0)."""
    from trimkv.train.optim import lr_lambda

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = transformers.get_cosine_with_min_lr_schedule_with_warmup(
        opt, num_warmup_steps=4, num_training_steps=20, min_lr=0.1).lr_lambdas[0]
    mine = [lr_lambda(s, warmup=4, total=20, lr=1.0, min_lr=0.1) for s in range(21)]
    assert mine[4:] == pytest.approx([theirs(s) for s in range(4, 21)], abs=1e-12)
    assert theirs(0) == 0.0 and mine[0] == pytest.approx(1 / 5)
