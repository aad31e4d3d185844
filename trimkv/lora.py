"""LoRA co-training: peft LoRA adapters on the attention projections, trained together with the gates.

The paper trains the gates of a frozen model; a frozen model cannot adapt to the tokens its bounded cache loses. With
a recipe's ``lora`` section, low-rank adapters (peft, :class:`peft.LoraConfig`) are injected into the attention
projections of the base model **in place** (the model object stays the one trimkv hooks into; the
:class:`peft.PeftModel` returned here is the handle on the adapters) and train with the gates:

    student = base + LoRA + gates          teacher = base alone (adapters AND gates off: ``GateHandle.disabled()``)

Adapters are saved beside the gates as a standard peft adapter folder, ``<gate checkpoint>/lora/``
(``adapter_config.json`` + ``adapter_model.safetensors``), which ``PeftModel.from_pretrained(model, folder)`` reads
like any other; :func:`trimkv.share.load_gates` loads both.

peft is imported on first use, like DeepSpeed in :mod:`trimkv.train.engines`: it loads parts of transformers that
trimkv never uses and more than doubled the time of ``import trimkv`` (17 s -> 40 s on the busy 2-core CPU) for a
feature most runs leave off.
"""
from __future__ import annotations

import contextlib
import copy
import os
import pathlib
import warnings
from typing import Iterator, Sequence

import torch
from safetensors.torch import save_file

from .extras import require

LORA_DIR = "lora"                                 # the adapter folder inside a gate checkpoint
ADAPTER_CONFIG = "adapter_config.json"            # peft's file names
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def add_lora(model: torch.nn.Module, *, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             target_modules: Sequence[str] = DEFAULT_TARGETS):
    """Inject fresh, trainable LoRA adapters into ``model``'s ``target_modules`` (in place; B = 0, so the model's
    output is unchanged until they train) and return their ``peft.PeftModel``. Only the adapters require grad
    afterwards."""
    require("peft", "LoRA co-training (a recipe's lora.enabled: true)")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=int(r), lora_alpha=float(alpha), lora_dropout=float(dropout),
                        target_modules=list(target_modules), bias="none")
    try:
        with _quiet_peft():
            return get_peft_model(model, config)
    except ValueError as err:   # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"LoRA target_modules={list(target_modules)} do not match {type(model).__name__}'s module "
                         f"names ({err}); name the attention projections of this family (lora.target_modules)") from err


def load_lora(model: torch.nn.Module, folder: str | os.PathLike):
    """Inject the adapters saved in ``folder`` (a peft adapter folder) into ``model``, in place, frozen; returns their
    ``peft.PeftModel``."""
    require("peft", f"a gate checkpoint with LoRA adapters ({folder})")
    from peft import PeftModel

    with _quiet_peft():
        return PeftModel.from_pretrained(model, str(folder), is_trainable=False)


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft asks transformers 5.x a deprecated question (``is_gradient_checkpointing``); the warning is not ours."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def adapter_state_dict(adapters) -> dict[str, torch.Tensor]:
    """The adapter weights of a ``peft.PeftModel`` as ``adapter_model.safetensors`` holds them (peft's keys), CPU fp32
    contiguous clones."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(adapters)
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()}


def load_adapter_state_dict(adapters, state: dict[str, torch.Tensor]) -> None:
    """Write ``state`` (as :func:`adapter_state_dict` returns it) into the injected adapters; every key must land."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(adapters, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise KeyError(f"adapter weights {unexpected[:4]} have no LoRA module in this model (different target_modules "
                       "or base model?)")


def save_lora(adapters, folder: str | os.PathLike, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write a standard peft adapter folder: ``adapter_config.json`` and ``adapter_model.safetensors`` (``state``, or
    the adapters' current weights)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(adapters.peft_config[adapters.active_adapter])
    config.inference_mode = True                  # as PeftModel.save_pretrained writes it
    config.save_pretrained(str(folder))
    weights = adapter_state_dict(adapters) if state is None else state
    save_file(weights, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def has_lora(folder: str | os.PathLike) -> bool:
    """Does the gate checkpoint ``folder`` carry LoRA adapters (``lora/adapter_config.json``)?"""
    return (pathlib.Path(folder) / LORA_DIR / ADAPTER_CONFIG).is_file()
