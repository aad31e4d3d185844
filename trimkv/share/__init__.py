"""Export and share gate checkpoints.

A gate checkpoint is a folder a person can open: ``config.json`` (the :class:`~trimkv.gate.GateConfig` and the format
version), ``model.safetensors`` (the gates' fp32 weights, independent of the base model's module tree), ``README.md``
(a model card with Hub front matter) and, after LoRA co-training, a peft adapter folder ``lora/``. The same folder is
what goes to and comes from the Hugging Face Hub (``"user/name[@revision]"``); the authors' released layout
(``config.json`` + ``trimkv_weights.pth``) is read wherever a checkpoint is.

Read in this order:

* :mod:`.folder`  - ``save_gates`` (atomic), ``load_gate_checkpoint`` / ``load_gates`` / ``convert_checkpoint``
  (the authors' layout in) / ``export_checkpoint`` (the authors' layout out).
* :mod:`.layout`  - the file names, and reading ``config.json`` and the weights back with checks.
* :mod:`.hub`     - a source (folder or Hub id) resolved to a local folder, downloads, ``push_to_hub``.
* :mod:`.authors` - the authors' released layout, mapped exactly onto trimkv's gates.
* :mod:`.card`    - model cards: front matter, summary, eval results, a usage snippet that runs as written.

Every failure raises a :class:`~trimkv.errors.GateCheckpointError` subclass (importable from here too).
"""
from ..errors import CheckpointNotFoundError, CorruptCheckpointError, GateCheckpointError, GateMismatchError
from .card import write_model_card
from .folder import (EXPORT_FORMATS, PretrainedGates, base_model_for, check_writable, convert_checkpoint, export_checkpoint,
                     load_gate_checkpoint, load_gate_config, load_gates, save_gates)
from .hub import parse_source, push_to_hub

__all__ = ["save_gates", "load_gate_checkpoint", "load_gate_config", "load_gates", "convert_checkpoint",
           "export_checkpoint", "EXPORT_FORMATS", "PretrainedGates",
           "push_to_hub", "check_writable", "base_model_for", "parse_source", "write_model_card",
           "GateCheckpointError", "CheckpointNotFoundError", "CorruptCheckpointError", "GateMismatchError"]
