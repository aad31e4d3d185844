"""Gate-training step vs a plain frozen forward+backward of the same model at the same length.

* gate step: one optimiser step of the plain engine, exactly as ``trimkv train`` runs it: the host-side batch
  preparation, :func:`trimkv.train.step.training_step` (teacher forward under no_grad with the gates off, student forward
  with the gates on, KL + NTP through the LM head, capacity loss) under the recipe's autocast (bf16 on GPU), its
  backward into the gate parameters, clipping and AdamW;
* frozen fwd+bwd: the same model without gates, ``model(inputs_embeds=..., labels=...)`` and ``loss.backward()``
  with gradients flowing through every frozen layer to the input embeddings (no weight gradients), i.e. the
  cheapest backward that still traverses the network like the gate gradients do.
"""
from __future__ import annotations

import torch

from trimkv.attach import attach_gates
from trimkv.train.engines import PlainEngine
from trimkv.recipe import parse_recipe

try:
    from . import common
except ImportError:  # python bench/train_step.py
    import common


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=None, help="tokens (default 512 CPU, 4096 GPU; 64 with --quick)")
    p.add_argument("--attn-impl", default="auto", help="gate training attention: auto | reference | chunked | ...")
    p.add_argument("--repeat", type=int, default=None)
    args = p.parse_args(argv)
    common.setup(args)
    gpu = args.device.startswith("cuda")
    T = args.length or (64 if args.quick else 4096 if gpu else 512)
    repeat = args.repeat or (1 if args.quick else 3)
    model, cfg = common.load(args)
    for prm in model.parameters():
        prm.requires_grad_(False)
    ids = torch.randint(0, cfg.vocab_size, (1, T))
    batch = {"input_ids": ids, "position_ids": torch.arange(T)[None],
             "loss_mask": torch.ones_like(ids, dtype=torch.bool)}                  # a CPU batch, as the loader gives
    ids_dev = ids.to(args.device)
    emb = model.get_input_embeddings()

    def frozen():
        x = emb(ids_dev).detach().requires_grad_(True)
        model(inputs_embeds=x, labels=ids_dev).loss.backward()

    t_frozen = common.timeit(frozen, repeat=repeat, warmup=1, device=args.device)
    recipe = parse_recipe({"data": {"source": "builtin:prose", "seq_len": T},
                           "loss": {"budget": max(1, T // 8), "chunk_size": 1024},
                           "train": {"attn_impl": args.attn_impl, "device": args.device, "lr": 1e-4}})
    handle = attach_gates(model, attn_impl=args.attn_impl)
    engine = PlainEngine(model, handle, recipe)

    def gate_step():
        engine.forward_backward(batch, last=True)
        engine.optimizer_step()

    t_gate = common.timeit(gate_step, repeat=repeat, warmup=2, device=args.device)
    handle.detach()
    rows = [{"tokens": T, "attn_impl": args.attn_impl, "dtype": str(next(model.parameters()).dtype)[6:],
             "frozen_fwd_bwd_s": t_frozen, "gate_step_s": t_gate, "ratio": t_gate / t_frozen}]
    title = (f"gate-training step (plain engine, one optimiser step) vs frozen forward+backward, "
             f"{type(model).__name__} on {args.device} (target: <= 1.5x on GPU)")
    return common.finish(args, "train_step", rows, title)


if __name__ == "__main__":
    main()
