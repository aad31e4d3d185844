"""Training: the step lowers the loss, only the gates change, the schedule's endpoints, and the loop writes
metrics.jsonl (a tiny random model, a fixed batch, CPU)."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from conftest import build_tiny_model
from trimkv.attach import GATES_ATTR, attach_gates
from trimkv.recipe import LossSection, parse_recipe
from trimkv.train.loop import MetricsLog, train_loop
from trimkv.train.optim import build_optimizer, lr_lambda
from trimkv.train.step import training_step


def fixed_batch(B: int = 2, T: int = 32) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 128, (B, T), generator=torch.Generator().manual_seed(5))
    pos = torch.arange(T).expand(B, T).clone()
    pos[1, 20:] = torch.arange(T - 20)                      # row 1 packs two documents
    return {"input_ids": ids, "position_ids": pos, "loss_mask": torch.ones(B, T, dtype=torch.bool)}


def recipe_for(tmp_path, **train):
    return parse_recipe({
        "data": {"source": "builtin:prose", "seq_len": 32},
        "gates": {"gate_hidden": 16, "bias_init": 3.0},
        "loss": {"budget": 4, "chunk_size": 16},
        "train": {"steps": 3, "lr": 1e-2, "warmup_steps": 0, "min_lr": 1e-3, "device": "cpu", **train},
        "output": {"run_dir": str(tmp_path / "run")},
    })


def test_training_steps_lower_the_loss_and_only_gates_change():
    model = build_tiny_model("llama")
    handle = attach_gates(model, gate_hidden=16, bias_init=3.0)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith(GATES_ATTR)}
    gates0 = {n: p.detach().clone() for n, p in handle.gates.named_parameters()}
    opt = torch.optim.AdamW(handle.gates.parameters(), lr=1e-2)
    batch, cfg = fixed_batch(), LossSection(budget=4, chunk_size=16)
    losses = []
    for _ in range(6):
        out = training_step(model, handle, batch, cfg)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        assert torch.isfinite(out.loss)
        assert out.loss.item() == pytest.approx(out.kl.item() + out.ntp.item() + out.cap.item(), rel=1e-5)
    assert losses[-1] < losses[0] - 1e-3, losses
    assert out.cap.item() > 0 and len(out.mean_beta) == 2
    for n, p in model.named_parameters():
        if not n.startswith(GATES_ATTR):
            assert torch.equal(p, base[n]), f"frozen weight {n} changed"
            assert p.grad is None
    assert any(not torch.equal(p, gates0[n]) for n, p in handle.gates.named_parameters())


def test_teacher_equals_student_at_init():
    """bias 18: beta ~ 1, the gated model is the frozen model, so KL ~ 0 and no capacity pressure below M."""
    model = build_tiny_model("qwen3")
    handle = attach_gates(model, gate_hidden=16)
    out = training_step(model, handle, fixed_batch(), LossSection(budget=64, chunk_size=16))
    assert out.kl.item() < 1e-6 and out.cap.item() == 0.0
    assert out.soft_cache == pytest.approx((32 + 20) / 2, abs=1e-3)   # no decay: S_t = t per document


def test_lr_schedule_endpoints():
    kw = dict(warmup=10, total=110, lr=1e-3, min_lr=1e-5)
    assert lr_lambda(0, **kw) == pytest.approx(1 / 11)                 # warm-up starts small, not at 0
    ramp = [lr_lambda(s, **kw) for s in range(10)]
    assert ramp == sorted(ramp) and ramp[-1] < 1
    assert lr_lambda(10, **kw) == pytest.approx(1.0)                   # peak right after warm-up
    assert lr_lambda(60, **kw) == pytest.approx((1 + 1e-2) / 2)        # cosine midpoint
    assert lr_lambda(110, **kw) == pytest.approx(1e-2)                 # ends at min_lr / lr
    assert lr_lambda(500, **kw) == pytest.approx(1e-2)                 # and stays there
    cosine = [lr_lambda(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))
    assert lr_lambda(0, warmup=0, total=5, lr=1.0, min_lr=0.0) == pytest.approx(1.0)


def test_optimizer_and_scheduler_follow_the_recipe(tmp_path):
    recipe = recipe_for(tmp_path, warmup_steps=2, steps=10, lr=1e-2, min_lr=1e-4)
    model = build_tiny_model("llama")
    handle = attach_gates(model, gate_hidden=16)
    opt, sched = build_optimizer(model.parameters(), recipe.train)     # frozen base params are filtered out
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == handle.gates.num_parameters()
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-2 / 3) and max(lrs) == pytest.approx(1e-2)
    assert sched.get_last_lr()[0] == pytest.approx(1e-4)


def test_train_loop_writes_metrics_jsonl(tmp_path):
    recipe = recipe_for(tmp_path, steps=3, log_every=2)
    model = build_tiny_model("llama")
    handle = attach_gates(model, gate_hidden=16, bias_init=3.0)
    before = [p.detach().clone() for p in handle.gates.parameters()]
    run_dir = tmp_path / "run"
    log = MetricsLog(run_dir, recipe)
    history = train_loop(model, handle, itertools.repeat(fixed_batch()), recipe, log=log, progress=False)
    log.close()
    assert [h["step"] for h in history] == [1, 2, 3]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [2, 3]                        # every log_every steps + the last one
    keys = {"loss", "kl", "ntp", "cap", "soft_cache", "mean_beta", "grad_norm", "lr", "tokens_per_s"}
    for m in lines:
        assert keys <= set(m)
        assert all(math.isfinite(m[k]) for k in keys - {"mean_beta"})
        assert len(m["mean_beta"]) == 2 and all(0 < b <= 1 for b in m["mean_beta"])
    assert history[-1]["loss"] < history[0]["loss"]
    assert any(not torch.equal(a, b) for a, b in zip(before, handle.gates.parameters()))


def test_train_loop_accumulates_micro_batches(tmp_path):
    recipe = recipe_for(tmp_path, steps=2, grad_accum=2)
    model = build_tiny_model("llama")
    handle = attach_gates(model, gate_hidden=16, bias_init=3.0)
    seen = []

    def stream():
        while True:
            seen.append(1)
            yield fixed_batch()

    history = train_loop(model, handle, stream(), recipe, progress=False)
    assert len(history) == 2 and len(seen) == 4


class FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter."""

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False

    def add_scalar(self, name, value, global_step):
        self.scalars.append((name, value, global_step))

    def close(self):
        self.closed = True


def test_metrics_log_writes_tensorboard_scalars_beside_jsonl(tmp_path, monkeypatch):
    from trimkv.train import loop

    writers = []
    monkeypatch.setattr(loop, "tensorboard_writer", lambda d: writers.append(FakeWriter(d)) or writers[-1])
    recipe = parse_recipe({"data": {"source": "builtin:prose"}, "logging": {"tensorboard": True},
                           "output": {"run_dir": str(tmp_path / "run")}})
    log = MetricsLog(tmp_path / "run", recipe)
    log.log(5, {"loss": 1.5, "mean_beta": [0.9, 0.8], "note": "text", "lr": 1e-3})
    log.close()
    (w,) = writers
    assert w.log_dir == tmp_path / "run" / "tensorboard" and w.closed
    assert w.scalars == [("loss", 1.5, 5), ("mean_beta/0", 0.9, 5), ("mean_beta/1", 0.8, 5), ("lr", 1e-3, 5)]
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["note"] == "text"


def test_tensorboard_without_the_package_names_the_extra(tmp_path, monkeypatch):
    import sys

    from trimkv.recipe import RecipeError
    from trimkv.train.loop import tensorboard_writer

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)     # as if tensorboard were not installed
    with pytest.raises(RecipeError, match=r"trimkv-gates\[tensorboard\]"):
        tensorboard_writer(tmp_path)


def test_tensorboard_events_are_written_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from trimkv.train.loop import tensorboard_writer

    writer = tensorboard_writer(tmp_path / "tb")
    writer.add_scalar("loss", 1.0, global_step=1)
    writer.close()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_training_pushes_each_checkpoint_and_the_final_gates(tmp_path, fake_hub):
    import yaml

    from _tinyrun import make_data, make_model_dir, recipe_dict
    from trimkv.train.run import finetune

    raw = recipe_dict(make_model_dir(tmp_path / "model"), make_data(tmp_path / "docs.jsonl"), tmp_path / "run",
                      steps=4, save_every=2)
    raw["output"].update(push_to_hub="me/tiny-gates", push_checkpoints=True, hub_private=True, license="mit")
    finetune(parse_recipe(raw), progress=False)
    assert [(u["repo_id"], u["commit_message"]) for u in fake_hub.uploads] == [
        ("me/tiny-gates", "trimkv gates at step 2"), ("me/tiny-gates", "trimkv gates at step 4"),
        ("me/tiny-gates", "trimkv gates after 4 steps")]
    assert fake_hub.created == ("me/tiny-gates", {"private": True, "exist_ok": True, "repo_type": "model"})
    card_text, config_text = fake_hub.uploads[-1]["card"], fake_hub.uploads[-1]["config"]
    front = yaml.safe_load(card_text.split("---\n")[1])
    assert front["license"] == "mit" and front["base_model"] == "model" and "datasets" not in front
    assert "load_model('model')" in card_text and "load_gates(model, 'me/tiny-gates')" in card_text
    for text in (card_text, config_text):
        assert str(tmp_path) not in text                                  # folder names only, never local paths


def test_a_run_without_tensorboard_installed_stops_before_loading_the_model(tmp_path, monkeypatch):
    import sys

    from trimkv.recipe import RecipeError
    from trimkv.train.run import finetune

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    recipe = recipe_for(tmp_path)
    recipe.model.name = str(tmp_path / "no-such-model")           # loading it would fail with another error
    recipe.logging.tensorboard = True
    with pytest.raises(RecipeError, match="tensorboard"):
        finetune(recipe, progress=False)
