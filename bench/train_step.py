"""Gate-training step vs a plain frozen forward+backward of the same model at the same length.

* gate step: :func:`trimkv.train.training_step` (teacher forward under no_grad with the gates off, student forward
  with the gates on, chunked KL + NTP, capacity loss) and its backward into the gate parameters;
* frozen fwd+bwd: the same model without gates, ``model(inputs_embeds=..., labels=...)`` and ``loss.backward()``
  with gradients flowing through every frozen layer to the input embeddings (no weight gradients), i.e. the
  cheapest backward that still traverses the network like the gate gradients do.
"""
from __future__ import annotations

import torch

from trimkv.attach import attach_gates
from trimkv.recipe import LossSection
from trimkv.train import training_step

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
    repeat = args.repeat or (1 if args.quick else 2)
    model, cfg = common.load(args)
    for prm in model.parameters():
        prm.requires_grad_(False)
    ids = torch.randint(0, cfg.vocab_size, (1, T), device=args.device)
    batch = {"input_ids": ids, "position_ids": torch.arange(T, device=args.device)[None],
             "loss_mask": torch.ones_like(ids, dtype=torch.bool)}
    emb = model.get_input_embeddings()

    def frozen():
        x = emb(ids).detach().requires_grad_(True)
        model(inputs_embeds=x, labels=ids).loss.backward()

    t_frozen = common.timeit(frozen, repeat=repeat, warmup=1, device=args.device)
    handle = attach_gates(model, attn_impl=args.attn_impl)
    loss_cfg = LossSection(budget=max(1, T // 8))

    def gate_step():
        handle.gates.zero_grad(set_to_none=True)
        training_step(model, handle, batch, loss_cfg).loss.backward()

    t_gate = common.timeit(gate_step, repeat=repeat, warmup=1, device=args.device)
    handle.detach()
    rows = [{"tokens": T, "attn_impl": args.attn_impl, "frozen_fwd_bwd_s": t_frozen, "gate_step_s": t_gate,
             "ratio": t_gate / t_frozen}]
    title = f"gate-training step vs frozen forward+backward, {type(model).__name__} on {args.device} (target <= 1.3x)"
    return common.finish(args, "train_step", rows, title)


if __name__ == "__main__":
    main()
