"""The gate-training step, visible code (engines wrap it, they do not own it):

    loss = kl_weight * KL(teacher || gated) + ntp_weight * CE + capacity_weight * L_cap

The teacher is the same frozen model with the gates switched off (``handle.disabled()``) under ``no_grad``; no
second model is held in memory. Only gate parameters receive updates; gradients still flow through the frozen
layers so that a gate in layer l learns from what layers > l need.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..attach import GateHandle
from ..attention import capacity_sums
from ..losses import capacity_loss, distillation_losses, scored_rows


@dataclass
class StepOutput:
    loss: torch.Tensor
    kl: torch.Tensor
    ntp: torch.Tensor
    cap: torch.Tensor
    soft_cache: torch.Tensor    # [] peak soft cache size max_t S_t, mean over layers and heads (detached)
    mean_beta: torch.Tensor     # [L] mean beta per layer (detached; read once per step by step_metrics)


def prepare_batch(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, Any]:
    """A data batch (CPU tensors [B, T]) on ``device``, plus what the step needs to know about it from the host:
    ``scored_rows`` (flat indices of the positions whose next token is a target) and ``packed`` (does any row hold
    several documents). Working these out here, before the copy, keeps the GPU step free of host syncs; on CUDA the
    tensors are copied from pinned memory, so the copies queue behind the running step instead of waiting for it."""
    pos, mask = batch["position_ids"], batch["loss_mask"].bool()
    # A copy from pageable memory would wait for the GPU's queue. The pinned path has not run on a GPU yet (issue 24);
    # tests/test_gpu.py's host-sync test covers it there.
    pin = torch.device(device).type == "cuda"
    host = {**batch, "scored_rows": scored_rows(mask.cpu())}
    out: dict[str, Any] = {k: (v.pin_memory() if pin and v.device.type == "cpu" else v).to(device, non_blocking=True)
                           for k, v in host.items()}
    out["packed"] = bool((pos[:, 1:] != pos[:, :-1] + 1).any())
    return out


def training_step(model: torch.nn.Module, handle: GateHandle, batch: dict[str, Any],
                  loss_cfg: Any) -> StepOutput:
    """One forward of teacher and student and the three losses (no backward, no optimiser).

    ``loss_cfg``: the recipe's ``loss`` section (:class:`trimkv.recipe.LossSection`: budget, weights, capacity form
    and scope, LM-head chunk size).
    ``batch``: ``input_ids`` / ``position_ids`` / ``loss_mask`` [B, T], optionally with the host-side extras of
    :func:`prepare_batch` (``scored_rows``, ``packed``).
    """
    input_ids, position_ids, loss_mask = batch["input_ids"], batch["position_ids"], batch["loss_mask"]
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    with handle.rows_packed(batch.get("packed")):
        with torch.no_grad(), handle.disabled():
            teacher = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        with handle.recording() as records:
            student = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    softcap = getattr(model.config, "final_logit_softcapping", None)
    kl, ntp = distillation_losses(student, teacher, lm_head, input_ids, loss_mask, rows=batch.get("scored_rows"),
                                  chunk_size=loss_cfg.chunk_size, logit_softcap=softcap)
    if not records:
        raise RuntimeError("no gate records were collected: are the gates attached and enabled?")
    # Every layer sees the same positions: one capacity computation over all layers' heads [B, L * Hkv, T]
    # (per_head: the mean over it is the mean over layers of each layer's capacity loss, all layers being the same
    # size; global: the L * Hkv rows are summed against M * L * Hkv).
    first = records[min(records)]
    logb = torch.cat([records[idx].logb for idx in sorted(records)], dim=1)            # [B, L * Hkv, T]
    S = capacity_sums(logb, first.pos, first.seg)                                       # [B, L * Hkv, T]
    cap = capacity_loss(S, first.pos, loss_cfg.budget, form=loss_cfg.capacity_form, scope=loss_cfg.capacity_scope)
    L = len(records)
    loss = loss_cfg.kl_weight * kl + loss_cfg.ntp_weight * ntp + loss_cfg.capacity_weight * cap
    # metrics stay on the device: no per-layer host sync inside the step
    soft_cache = S.detach().amax(-1).mean()                                             # peak soft cache size
    mean_beta = logb.detach().exp().unflatten(1, (L, -1)).mean(dim=(0, 2, 3))           # [L]
    return StepOutput(loss, kl.detach(), ntp.detach(), cap.detach(), soft_cache, mean_beta)
