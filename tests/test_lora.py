"""LoRA co-training: only gates and adapters train, the teacher is the original model (adapters and gates off), a
LoRA+gates checkpoint reproduces the trained model's logits through load_gates, and a LoRA run resumes exactly."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from _tinyrun import make_data, make_model_dir, read_metrics, recipe_dict
from conftest import build_tiny_model
from trimkv.attach import GATES_ATTR, attach_gates
from trimkv.share import load_gates, save_gates
from trimkv.eval import harness
from trimkv.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORA_DIR, add_lora
from trimkv.recipe import LossSection, parse_recipe
from trimkv.train.state import ADAPTERS_FILE, ResumeError, TrainingCheckpoints
from trimkv.train.engines import PlainEngine
from trimkv.train.run import finetune
from trimkv.train.step import training_step

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(4))


def batch() -> dict[str, torch.Tensor]:
    B, T = IDS.shape
    return {"input_ids": IDS, "position_ids": torch.arange(T).expand(B, T).clone(),
            "loss_mask": torch.ones(B, T, dtype=torch.bool)}


def lora_model(seed: int = 0):
    """A tiny Llama with fresh LoRA adapters and gates attached (bias 3: the gates bite from step 0)."""
    model = build_tiny_model("llama", seed=seed)
    adapters = add_lora(model, r=4, alpha=8)
    handle = attach_gates(model, gate_hidden=16, bias_init=3.0, adapters=adapters)
    return model, handle


def train_steps(model, handle, n: int = 4) -> list[float]:
    opt = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(n):
        out = training_step(model, handle, batch(), LossSection(budget=4, chunk_size=16))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses


def test_only_gates_and_adapters_train_and_the_teacher_is_the_original_model():
    original = build_tiny_model("llama")(IDS).logits
    model, handle = lora_model()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n and GATES_ATTR not in n}
    lora_names = {n for n, p in model.named_parameters() if p.requires_grad and GATES_ATTR not in n}
    assert lora_names and all("lora_" in n for n in lora_names)
    assert len(handle.trainable_parameters()) == len(list(handle.gates.parameters())) + len(lora_names)
    losses = train_steps(model, handle)
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"frozen weight {n} changed"
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)   # B started at 0
    with torch.no_grad():
        student = model(IDS).logits
        with handle.disabled():                   # the teacher pass: gates AND adapters off
            teacher = model(IDS).logits
            with handle.disabled():               # nested: still off after the inner block
                pass
            torch.testing.assert_close(model(IDS).logits, original)
        again = model(IDS).logits
    torch.testing.assert_close(teacher, original)
    assert not torch.allclose(student, original, atol=1e-4)
    torch.testing.assert_close(again, student)    # both back on after the block


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")   # peft asks transformers, not us
def test_lora_and_gates_checkpoint_reproduces_the_trained_logits(tmp_path):
    model, handle = lora_model()
    train_steps(model, handle)
    with torch.no_grad():
        trained = model(IDS).logits
    folder = save_gates(handle.gates, tmp_path / "ckpt", adapters=handle.adapters)
    assert (folder / LORA_DIR / ADAPTER_CONFIG).is_file() and (folder / LORA_DIR / ADAPTER_WEIGHTS).is_file()

    fresh = build_tiny_model("llama")              # the same base weights, nothing attached
    with torch.no_grad():
        original = fresh(IDS).logits
    loaded = load_gates(fresh, folder)
    assert loaded.adapters is not None and not any(p.requires_grad for p in loaded.adapter_params)
    gates_only = SimpleNamespace(gates=loaded.gates, adapters=None)
    assert harness.gate_fingerprint(loaded) != harness.gate_fingerprint(gates_only)   # eval cells know the adapters
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, trained, rtol=0, atol=1e-6)
        with loaded.disabled():
            torch.testing.assert_close(fresh(IDS).logits, original)
    loaded.detach()                                # gates and adapters gone: the base model as it was
    assert type(fresh.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, original)

    plain = build_tiny_model("llama")              # lora/ is a standard peft adapter folder
    PeftModel.from_pretrained(plain, folder / LORA_DIR)
    stored = load_file(str(folder / LORA_DIR / ADAPTER_WEIGHTS))
    assert stored and all("lora_" in k for k in stored)


def test_unknown_target_modules_are_named():
    with pytest.raises(ValueError, match="target_modules"):
        add_lora(build_tiny_model("llama"), target_modules=["query_key_value"])


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("lora-run")
    return make_model_dir(base / "model"), make_data(base / "docs.jsonl", n_docs=3), base


def lora_recipe(tiny_setup, name: str, enabled: bool = True):
    model_dir, data, base = tiny_setup
    raw = recipe_dict(model_dir, data, base / name, steps=4, save_every=2, keep_last=3)
    raw["lora"] = {"enabled": enabled, "r": 4, "lr": 5e-3}
    return parse_recipe(raw)


def test_lora_run_exports_adapters_and_resumes_bit_identical(tiny_setup):
    full = lora_recipe(tiny_setup, "full")
    full_out = finetune(full, progress=False)
    cut = lora_recipe(tiny_setup, "cut")
    finetune(cut, progress=False, until_step=3)   # "preempted"; last checkpoint: step 2 (gates + adapters)
    step2 = Path(cut.output.run_dir) / "checkpoints" / "step-2"
    assert (step2 / ADAPTERS_FILE).is_file()
    cut_out = finetune(cut, progress=False, resume=True)
    for name in ("model.safetensors", f"{LORA_DIR}/{ADAPTER_WEIGHTS}"):
        a, b = load_file(str(full_out / name)), load_file(str(cut_out / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert [m["loss"] for m in read_metrics(Path(cut.output.run_dir))] == \
        [m["loss"] for m in read_metrics(Path(full.output.run_dir))]
    lora_b = load_file(str(full_out / LORA_DIR / ADAPTER_WEIGHTS))
    assert any(v.abs().sum() > 0 for k, v in lora_b.items() if "lora_B" in k)   # the adapters trained


def test_resume_refuses_a_checkpoint_written_with_the_other_lora_setting(tiny_setup):
    r = lora_recipe(tiny_setup, "full")           # the run above wrote adapters into its checkpoints
    gates_only = lora_recipe(tiny_setup, "gates-only", enabled=False)
    model = build_tiny_model("llama")
    engine = PlainEngine(model, attach_gates(model, gate_hidden=16), gates_only)   # a run without adapters
    ckpts = TrainingCheckpoints(Path(r.output.run_dir) / "checkpoints")
    with pytest.raises(ResumeError, match="lora.enabled"):
        ckpts.load(ckpts.steps()[-1][1], engine)
