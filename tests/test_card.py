"""Model cards: Hub front matter (license, base model, datasets, model-index from `trimkv eval`), public names only,
and a usage snippet that runs as written."""
from __future__ import annotations

import re

import pytest
import yaml

from conftest import build_tiny_model
from trimkv import save_gates
from trimkv.gate import GateConfig, RetentionGates
from trimkv.share import card, load_gate_checkpoint, push_to_hub

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gates(**config) -> RetentionGates:
    return RetentionGates(GateConfig(num_layers=2, hidden_size=64, num_kv_heads=2, head_dim=16, gate_hidden=8,
                                     train_budget=32, **config))


def front(text: str) -> dict:
    return yaml.safe_load(text.split("---\n")[1])


def snippet(text: str) -> str:
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def records(fingerprint: str) -> list[dict]:
    return [
        {"task": "passkey", "length": 2048, "budget": 64, "policy": "trimkv", "score": 0.4, "n": 10,
         "gates": fingerprint},
        {"task": "passkey", "length": 2048, "budget": 64, "policy": "trimkv", "score": 0.9, "n": 10,
         "gates": "other-gates"},
        {"task": "passkey", "length": 2048, "budget": None, "policy": "full", "score": 0.5, "n": 10},
        {"task": "passkey", "length": 2048, "budget": 64, "policy": "streaming", "score": 0.1, "n": 10},
        {"policy": "trimkv", "budget": 64, "kl": 0.16, "top1": 0.76, "prefix_tokens": 512,
         "continuation_tokens": 96, "gates": fingerprint},
    ]


def test_public_names_hide_local_paths():
    assert card.public_name("/home/me/models/Qwen3-4B") == "Qwen3-4B"
    assert card.public_name("~/gates/run1") == "run1"
    assert card.public_name("Qwen/Qwen3-4B") == "Qwen/Qwen3-4B" and card.public_name("checkpoints/g") == "checkpoints/g"
    assert card.public_name("mixture of /data/a.jsonl (0.5), builtin:qa (0.5)") == "mixture of a.jsonl (0.5), builtin:qa (0.5)"


def test_card_front_matter_carries_license_datasets_base_model_and_budget(tmp_path):
    gates = tiny_gates(base_model=str(tmp_path / "bases" / "tiny-llama"), base_load_kwargs={"name": str(tmp_path)})
    meta = {"license": "apache-2.0", "datasets": ["user/long-qa"], "data": f"{tmp_path}/docs.jsonl", "steps": 3}
    out = save_gates(gates, tmp_path / "gates", metadata=meta)
    text = (out / "README.md").read_text()
    assert front(text) == {"library_name": "trimkv", "license": "apache-2.0", "base_model": "tiny-llama",
                           "datasets": ["user/long-qa"], "tags": ["trimkv", "kv-cache"]}
    assert "| Training KV budget M | 32 tokens |" in text and "**data**: docs.jsonl" in text
    for name in ("README.md", "config.json"):
        assert str(tmp_path) not in (out / name).read_text(), name
    assert load_gate_checkpoint(out).config.base_model == "tiny-llama"


def test_model_index_holds_only_these_gates_results(tmp_path):
    gates = tiny_gates(base_model="tiny/llama")
    out = save_gates(gates, tmp_path / "gates", metadata={"eval_records": records(gates.fingerprint())})
    text = (out / "README.md").read_text()
    index = front(text)["model-index"][0]
    assert index["name"] == "gates"                                            # the folder, by name
    accuracy, fidelity = index["results"]
    assert accuracy["dataset"]["name"].startswith("passkey, 2048 tokens")
    assert [m["value"] for m in accuracy["metrics"]] == [40.0, 90.0]          # eval_results takes what it is given
    assert fidelity["metrics"] == [{"type": "kl_divergence", "name": "KL(full || bounded) at M=64", "value": 0.16}]
    assert "| passkey | 2048 | 64 | 40.0% | 50.0% |" in text


def test_push_adds_this_checkpoints_eval_results_and_names_the_repo(tmp_path, fake_hub):
    gates = tiny_gates(base_model="tiny/llama")
    out = save_gates(gates, tmp_path / "gates", metadata={"license": "mit", "steps": 7})
    push_to_hub(out, "user/g", eval_records=records(gates.fingerprint()))
    card_text = fake_hub.uploads[-1]["card"]
    meta = front(card_text)
    assert meta["license"] == "mit" and meta["model-index"][0]["name"] == "user/g"
    values = [m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]]
    assert values == [40.0]                                                   # the other gates' 90% is left out
    assert "**steps**: 7" in card_text and "load_gates(model, 'user/g')" in card_text
    push_to_hub(out, "user/g")                                                # no results: no model-index
    assert "model-index" not in front(fake_hub.uploads[-1]["card"])


@pytest.mark.parametrize("load", [{"name": "smollm2"}, {}])
def test_usage_snippet_runs_as_written(tmp_path, monkeypatch, tokenizer, load):
    """The snippet of a saved card, executed from the folder's parent with load_model standing in for the Hub."""
    from trimkv.base_model import DEFAULT_MODEL_ID

    gates = tiny_gates(base_model=DEFAULT_MODEL_ID, base_load_kwargs=load)
    monkeypatch.chdir(tmp_path)
    out = save_gates(gates, "gates")
    code = snippet((out / "README.md").read_text())
    assert "load_model('smollm2')" in code and "load_gates(model, 'gates')" in code and "budget=32" in code
    seen = []

    def fake_load_model(name, **kwargs):
        seen.append(name)
        return build_tiny_model("llama", vocab_size=len(tokenizer)), tokenizer

    monkeypatch.setattr("trimkv.base_model.load_model", fake_load_model)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert seen == ["smollm2"] and len(scope["out"].answers) == 1 and scope["out"].kv_bytes > 0


def test_refresh_keeps_the_body_and_replaces_usage(tmp_path):
    gates = tiny_gates(base_model="Qwen/Qwen3-4B", base_revision="abc")
    out = save_gates(gates, tmp_path / "gates", metadata={"note": "kept"})
    path = out / "README.md"
    card.refresh_model_card(path, gates.config, source="me/qwen-gates")
    text = path.read_text()
    assert "**note**: kept" in text and text.count("## Usage") == 1
    assert "load_model('Qwen/Qwen3-4B', revision='abc')" in text and "'me/qwen-gates'" in text
