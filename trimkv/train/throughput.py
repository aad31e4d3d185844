"""Training throughput: how much work a gate-training step is, how fast the chip could do it, and how many rows
of a given length fit its memory.

    flops = step_flops(model.config, tokens=16 * 4096, seq_len=4096, scored=4096, gate_params=4.4e6)
    mfu = flops / seconds / peak_flops(torch.device("cuda"))
    rows = rows_for_memory(lambda b: peak_bytes_of_a_step_with(b), limit_bytes=0.85 * total_memory)

**Model FLOPs** count the matrix products the step must do, not what the kernels happen to do (recomputation,
padding, masked halves of causal tiles are not counted), the usual definition of model FLOPs utilisation (MFU):

* one decoder forward per token: ``2 * P_linear`` (every q/k/v/o and MLP weight once) plus the attention's two
  products, ``2 * 2 * heads * head_dim * c`` where ``c = (T + 1) / 2`` is the mean causal context of a row of T
  tokens;
* the gate-training step (:func:`trimkv.train.step.training_step`): the teacher forward, the student forward and the
  student backward through the frozen layers. Frozen weights get no gradient, so the backward of a linear layer is
  one product (the input gradient), the same as its forward; the attention backward is four products (dQ, dK, dV
  and dP) against the forward's two. The LM head runs only on the scored positions (KL and NTP on the targets):
  teacher forward, student forward and backward, ``2 * d * V`` each. The gates' own MLP: forward, and a backward
  with weight and input gradients;
* the frozen forward+backward it is compared with (``bench/train_step.py``): one forward and one input-gradient
  backward of the whole model with the LM head on every position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import RecipeError

# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s, no sparsity). MFU is reported against these;
# a chip that is not listed gets no MFU (None) rather than a guess.
PEAK_BF16_FLOPS = {
    "H200": 989.4e12,
    "H100 SXM": 989.4e12,
    "H100 80GB HBM3": 989.4e12,
    "H100 PCIe": 756.0e12,
    "H100": 989.4e12,
    "A100": 312.0e12,
    "L40S": 362.1e12,
    "L4": 121.0e12,
}


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count reads from a transformers config."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config) -> "ModelShape":
        heads = config.num_attention_heads
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   intermediate=config.intermediate_size, vocab=config.vocab_size)

    @property
    def linear_params(self) -> int:
        """Weights of one decoder layer's matrix products (q, k, v, o and a gated MLP's three)."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return attn + 3 * self.hidden * self.intermediate


def decoder_flops(shape: ModelShape, tokens: int, seq_len: int) -> tuple[float, float]:
    """(linear, attention) FLOPs of one decoder forward over ``tokens`` tokens in rows of ``seq_len``."""
    context = (seq_len + 1) / 2                                      # mean causal context of a row
    linear = 2.0 * shape.layers * shape.linear_params * tokens
    attention = 4.0 * shape.layers * shape.heads * shape.head_dim * context * tokens
    return linear, attention


def step_flops(config, *, tokens: int, seq_len: int, scored: int, gate_params: int = 0) -> float:
    """Model FLOPs of one gate-training step over ``tokens`` tokens (rows of ``seq_len``) with ``scored`` target
    positions (see the module docstring)."""
    shape = ModelShape.of(config)
    linear, attention = decoder_flops(shape, tokens, seq_len)
    teacher = linear + attention
    student = (linear + attention) + (linear + 2 * attention)        # forward + input-gradient backward
    head = 2.0 * shape.hidden * shape.vocab * scored * 3             # teacher fwd, student fwd + bwd
    gates = 2.0 * gate_params * tokens * 3                           # forward, weight and input gradients
    return teacher + student + head + gates


def frozen_fwd_bwd_flops(config, *, tokens: int, seq_len: int) -> float:
    """Model FLOPs of one forward and input-gradient backward of the frozen model, LM head on every position."""
    shape = ModelShape.of(config)
    linear, attention = decoder_flops(shape, tokens, seq_len)
    head = 2.0 * shape.hidden * shape.vocab * tokens
    return (linear + attention + head) + (linear + 2 * attention + head)


def peak_flops(device: torch.device | str) -> float | None:
    """The chip's dense bf16 peak in FLOP/s (:data:`PEAK_BF16_FLOPS`), None for a CPU or an unlisted GPU."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():                       # the most specific names come first
        if key in name:
            return value
    return None


def rows_for_memory(peak_bytes: Callable[[int], int], *, limit_bytes: float, probe: tuple[int, int] = (1, 2),
                    most: int = 1024) -> int:
    """The most rows whose step stays under ``limit_bytes``, from two probe steps.

    ``peak_bytes(rows)`` runs one step with that many rows and returns its peak memory (e.g.
    ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``). Peak memory of a step is affine in the
    rows (the weights, plus activations per row), so two probes give the line; the answer is rounded down, at least
    ``probe[0]`` and at most ``most``. Raises RecipeError when even the first probe does not fit."""
    a, b = probe
    if not 0 < a < b:
        raise ValueError(f"probe={probe}: need two row counts 0 < a < b")
    pa, pb = peak_bytes(a), peak_bytes(b)
    if pa > limit_bytes:
        raise RecipeError(f"one step of {a} row(s) already peaks at {pa / 2**30:.1f} GiB, over the limit of "
                         f"{limit_bytes / 2**30:.1f} GiB: shorten the rows (data.seq_len) or turn on "
                         "train.gradient_checkpointing")
    per_row = max((pb - pa) / (b - a), 1.0)
    fixed = pa - a * per_row
    return int(max(a, min(most, (limit_bytes - fixed) // per_row)))


def first_that_fits(step: Callable[[int], object], rows: int) -> int:
    """``rows``, halved until one ``step(rows)`` runs without running out of GPU memory (the line through two probes
    can miss by the allocator's fragmentation). The step's partial gradients of a failed try are left behind: size
    with a model whose optimiser state does not matter, as :func:`rows_for_memory`'s callers do."""
    while True:
        try:
            step(rows)
            return rows
        except torch.cuda.OutOfMemoryError:
            if rows == 1:
                raise
            torch.cuda.empty_cache()
            rows //= 2
