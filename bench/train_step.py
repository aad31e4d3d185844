"""Gate-training step vs a plain frozen forward+backward of the same model at the same rows x length: seconds,
tokens/s and model FLOPs utilisation (MFU) side by side.

* gate step: one optimiser step of the plain engine, exactly as ``trimkv train`` runs it: the host-side batch
  preparation (pinned copies on CUDA), :func:`trimkv.train.step.training_step` (teacher forward under no_grad with the
  gates off, student forward with the gates on, KL + NTP through the LM head, capacity loss) under the recipe's
  autocast (bf16 on GPU), its backward into the gate parameters, clipping and AdamW, and the loop's one host transfer
  of the step's metrics;
* frozen fwd+bwd: the same model without gates, ``model(inputs_embeds=..., labels=...)`` and ``loss.backward()``
  with gradients flowing through every frozen layer to the input embeddings (no weight gradients), i.e. the
  cheapest backward that still traverses the network like the gate gradients do.

* trace (batch ``1`` only): :func:`trimkv.trace.capture.trace_row` on the same row with the default trace settings
  (every layer, targets ``future`` + ``answer``, horizons 16/64/256): the forward-only pass that ``trimkv trace``
  runs per row to learn from the model's own attention (issue: >= 2x the gate step's tokens/s), without the shard
  write.

Two batch settings per length: ``1`` row (the ratio the issue tracks) and ``max``: the most rows whose gate step fits
``--memory-fraction`` of the GPU's memory (:func:`trimkv.train.throughput.rows_for_memory`, two probe steps; capped
at ``--max-rows``), the batch a GPU recipe should train with. MFU = model FLOPs (:mod:`trimkv.train.throughput`) /
seconds / the chip's dense bf16 peak (no MFU on a CPU or an unlisted GPU). ``--scored`` is the fraction of
positions that are targets (1.0 = prose: KL and NTP everywhere; QA rows score a few answer tokens).
"""
from __future__ import annotations

import torch

from trimkv.attach import attach_gates
from trimkv.recipe import parse_recipe
from trimkv.train.engines import PlainEngine
from trimkv.train.loop import step_metrics
from trimkv.train.throughput import (first_that_fits, frozen_fwd_bwd_flops, peak_flops, rows_for_memory,
                                     step_flops)

try:
    from . import common
except ImportError:  # python bench/train_step.py
    import common


def make_batch(rows: int, T: int, vocab: int, scored: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """A CPU batch as the loader gives it: random ids, one document per row, ``scored`` of the positions targets."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, T), generator=g)
    mask = torch.rand(rows, T, generator=g) < scored
    mask[:, 0] = False
    return {"input_ids": ids, "position_ids": torch.arange(T).repeat(rows, 1), "loss_mask": mask}


class GateStep:
    """One optimiser step of the plain engine on a fixed batch (gates attached once, engine built once per T)."""

    def __init__(self, model, T: int, attn_impl: str, device: str):
        recipe = parse_recipe({"data": {"source": "builtin:prose", "seq_len": T},
                               "loss": {"budget": max(1, T // 8), "chunk_size": 1024},
                               "train": {"attn_impl": attn_impl, "device": device, "lr": 1e-4}})
        self.handle = attach_gates(model, attn_impl=attn_impl)
        self.engine = PlainEngine(model, self.handle, recipe)
        self.gate_params = sum(p.numel() for p in self.handle.gates.parameters())

    def __call__(self, batch) -> None:
        out = self.engine.forward_backward(batch, last=True)
        gnorm = self.engine.optimizer_step()
        step_metrics([out], gnorm, self.engine.lr(), 0.0)            # the loop's one host transfer per step

    def close(self) -> None:
        self.handle.detach()


def peak_of(fn, device: str) -> int:
    """Peak bytes allocated on the GPU while ``fn()`` runs."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def max_rows(model, cfg, T: int, args) -> int:
    """Rows of the 'max' setting: what fits ``--memory-fraction`` of the GPU (two probe steps), at most --max-rows;
    on a CPU exactly --max-rows."""
    if not args.device.startswith("cuda"):
        return args.max_rows
    # The CUDA sizing (peak memory of two probe steps) has not run on a GPU yet (issue 24): make gpu-verify runs it.
    step = GateStep(model, T, args.attn_impl, args.device)
    try:
        limit = args.memory_fraction * torch.cuda.get_device_properties(args.device).total_memory
        run = lambda b: step(make_batch(b, T, cfg.vocab_size, args.scored))  # noqa: E731
        rows = rows_for_memory(lambda b: peak_of(lambda: run(b), args.device), limit_bytes=limit, most=args.max_rows)
        return first_that_fits(run, rows)
    finally:
        step.close()


def measure_length(model, cfg, T: int, args) -> list[dict]:
    """The rows of one length: the frozen pass measured on the model without gates, then the gate step."""
    emb = model.get_input_embeddings()
    peak = peak_flops(args.device)
    settings = [("1", 1)] + ([("max", max_rows(model, cfg, T, args))] if args.max_rows > 1 else [])
    batches = {s: make_batch(rows, T, cfg.vocab_size, args.scored) for s, rows in settings}
    frozen_s = {}
    for setting, _ in settings:
        ids_dev = batches[setting]["input_ids"].to(args.device)

        def frozen():
            x = emb(ids_dev).detach().requires_grad_(True)
            model(inputs_embeds=x, labels=ids_dev).loss.backward()

        frozen_s[setting] = _timed(frozen, args)
        del ids_dev
    trace_s = _timed(lambda: trace_once(model, batches["1"], args.device), args)
    step = GateStep(model, T, args.attn_impl, args.device)
    out = []
    mfu = (lambda f, s: None if peak is None or s is None else f / s / peak)  # noqa: E731
    for setting, rows in settings:
        batch = batches[setting]
        t_gate, t_frozen = common.timeit(lambda: step(batch), repeat=args.repeat, warmup=2, device=args.device), \
            frozen_s[setting]
        tokens = rows * T
        scored = int(batch["loss_mask"][:, 1:].sum())
        gate_flops = step_flops(cfg, tokens=tokens, seq_len=T, scored=scored, gate_params=step.gate_params)
        frozen_flops = frozen_fwd_bwd_flops(cfg, tokens=tokens, seq_len=T)
        out.append({"tokens": T, "batch": setting, "rows": rows, "attn_impl": args.attn_impl,
                    "dtype": str(next(model.parameters()).dtype)[6:],
                    "frozen_fwd_bwd_s": t_frozen, "gate_step_s": t_gate,
                    "ratio": None if t_frozen is None else t_gate / t_frozen,
                    "gate_tok_s": tokens / t_gate, "frozen_tok_s": None if t_frozen is None else tokens / t_frozen,
                    "gate_mfu": mfu(gate_flops, t_gate), "frozen_mfu": mfu(frozen_flops, t_frozen),
                    "gate_TFLOP": gate_flops / 1e12})
        one = setting == "1" and trace_s is not None              # the trace pass: one row only
        out[-1].update(trace_s=trace_s if one else None, trace_tok_s=tokens / trace_s if one else None,
                       trace_speedup=t_gate / trace_s if one else None)
    step.close()
    return out


def trace_once(model, batch, device: str) -> None:
    """One row through :func:`trimkv.trace.capture.trace_row`, with the plan ``trimkv trace`` makes from the default
    trace settings (:func:`trimkv.trace.collect.trace_plan` of a store's manifest)."""
    from trimkv.trace.capture import trace_row
    from trimkv.trace.collect import plan_manifest, trace_plan
    from trimkv.trace.settings import TraceSettings

    settings = TraceSettings()
    T = batch["input_ids"].shape[1]
    data = parse_recipe({"data": {"source": "builtin:prose", "seq_len": T}}).data   # the plan reads no data
    plan = trace_plan(plan_manifest(model, data, settings, model_name="bench"), settings)
    trace_row(model, batch["input_ids"][0].to(device), batch["position_ids"][0].to(device),
              batch["loss_mask"][0].to(device), plan)


def _timed(fn, args) -> float | None:
    """Median seconds of ``fn``, or None when it does not fit the GPU (the frozen pass keeps every position's
    logits, which the gate step never does)."""
    try:
        return common.timeit(fn, repeat=args.repeat, warmup=1, device=args.device)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="tokens per row (default: GPU 2048 4096 8192, CPU 512, --quick 64)")
    p.add_argument("--length", type=int, default=None, help="one length (same as --lengths N)")
    p.add_argument("--attn-impl", default="auto", help="gate training attention: auto | reference | chunked | ...")
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--max-rows", type=int, default=None,
                   help="cap on the 'max' batch (default: GPU 64, CPU/--quick 1 = only the batch of 1; 2+ on a CPU "
                        "measures exactly that many rows)")
    p.add_argument("--memory-fraction", type=float, default=0.8, help="GPU memory the 'max' batch may use")
    p.add_argument("--scored", type=float, default=1.0, help="fraction of positions that are targets")
    args = p.parse_args(argv)
    common.setup(args)
    gpu = args.device.startswith("cuda")
    lengths = args.lengths or ([args.length] if args.length else [64] if args.quick else
                               [2048, 4096, 8192] if gpu else [512])
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.max_rows = args.max_rows or (64 if gpu and not args.quick else 1)
    model, cfg = common.load(args)
    for prm in model.parameters():
        prm.requires_grad_(False)
    rows = [r for T in lengths for r in measure_length(model, cfg, T, args)]
    title = (f"gate-training step (plain engine, one optimiser step) vs frozen forward+backward, "
             f"{type(model).__name__} on {args.device}, {args.scored:g} of positions scored "
             f"(targets: ratio <= 1.3x at 4k; tokens/s >= 270k at 2k on the default model)")
    return common.finish(args, "train_step", rows, title, {"peak_bf16_flops": peak_flops(args.device)})


if __name__ == "__main__":
    main()
