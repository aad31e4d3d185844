"""Training recipes: YAML files in ``recipes/`` parsed into dataclasses and validated once, up front.

A recipe has nine sections (``lora`` and ``trace`` are optional); every field is documented on its dataclass below. An unknown or mistyped field
raises :class:`RecipeError` naming it (and the close matches), so a typo never silently falls back to a default.

    model:   which frozen base model to load
    gates:   gate architecture (trimkv.gate.GateConfig fields)
    data:    training data (trimkv.data.DataConfig fields)
    loss:    memory budget M and loss weights
    lora:    optional LoRA adapters on the attention projections, co-trained with the gates (trimkv.lora)
    train:   optimiser, schedule, steps
    output:  where runs, logs and the exported gate checkpoint go (and the Hub repo it is pushed to)
    logging: wandb mode / project, TensorBoard (metrics.jsonl always)
    trace:   what `trimkv trace` records from the frozen model (trimkv.trace.TraceSettings fields, plus out)
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .attention import IMPLS
from .base_model import DTYPE_CHOICES
from .data import DataConfig
from .errors import RecipeError, decode_utf8
from .gate import ACTIVATIONS, GATE_TYPES
from .limits import MAX_GATE_HIDDEN, MAX_TOKENS
from .lora import DEFAULT_TARGETS
from .trace.settings import TraceSettings
from .losses import CAPACITY_FORMS, CAPACITY_SCOPES

ENGINES = ("auto", "plain", "ddp", "deepspeed")   # train.engine: the one list of engine names (trimkv.train.engines)
MAX_RECIPE_BYTES = 1 << 20


@dataclass
class ModelSection:
    name: str = "smollm2"            # "smollm2" = the embedded SmolLM2-135M-Instruct; or a Hub id / local folder
    revision: str | None = None      # Hub revision of the base model
    dtype: str = "float32"           # weights dtype: float32 | bfloat16 | float16 | auto (the checkpoint's own)
    gguf_file: str | None = None     # load a GGUF file from `name` (a folder) with transformers' gguf_file=
    trust_remote_code: bool = False  # only if you trust the model repository's code


@dataclass
class GatesSection:
    gate_type: str = "rg"            # trimkv.gate.GATE_TYPES: "rg" (attention input) | "rg2" (post-RoPE [k_h; v_h],
                                     # one MLP shared by the heads) | "rg2-all" / "rg3" (the authors' [k; v] gates) |
                                     # "rg10" (DBTrimKV: two-layer body, final projection + bias shared by all layers)
    activation: str = "silu"         # the gate MLP's nonlinearity (trimkv.gate.ACTIVATIONS)
    gate_hidden: int = 512           # MLP width (the paper uses 512; smaller for small models)
    bias_init: float = 18.0          # per-head bias init: beta ~ 1 at step 0 (the paper's value)
    init_std: float = 0.02           # std of the normal init of W1 and W2
    init_from: str | None = None     # start from trained gates (checkpoint folder or Hub id) instead of a fresh init;
                                     # their gate_type / gate_hidden must match the two fields above


@dataclass
class LossSection:
    budget: int = 512                # M: tokens per KV head the cache may hold (match the deployment budget)
    capacity_form: str = "paper"     # "paper": mean_t relu(S_t - M)/t | "code": authors' later normalisation
    capacity_scope: str = "per_head"  # trimkv.losses.CAPACITY_SCOPES: "per_head" (every head under M) | "global"
                                     # (DBTrimKV: the sum over layers and heads under M * layers * KV heads)
    kl_weight: float = 1.0           # weight of KL(teacher || gated)
    ntp_weight: float = 1.0          # weight of next-token cross-entropy
    capacity_weight: float = 1.0     # lambda, weight of the capacity loss
    chunk_size: int = 512            # positions per LM-head chunk (memory O(chunk x vocab))


@dataclass
class LoraSection:
    enabled: bool = False            # co-train peft LoRA adapters with the gates (the teacher stays the original model)
    r: int = 8                       # LoRA rank
    alpha: float = 16.0              # LoRA alpha: the update is scaled by alpha / r
    dropout: float = 0.0             # dropout on the adapters' input
    target_modules: tuple[str, ...] = DEFAULT_TARGETS   # module names to adapt (peft target_modules): the attention
                                     # projections q_proj, k_proj, v_proj, o_proj of Llama / Qwen / Mistral / Gemma
    lr: float = 2e-4                 # AdamW peak lr of the adapters (the gates use train.lr; same warm-up and cosine)


@dataclass
class TrainSection:
    steps: int = 1000                # optimiser steps
    lr: float = 2e-4                 # AdamW peak learning rate
    min_lr: float = 1e-6             # end of the cosine schedule
    warmup_steps: int = 100          # linear warm-up steps
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8           # AdamW eps. Gate grads start ~1e-8 (sigmoid(18) is saturated): a smaller eps
                                     # (e.g. 1e-15) lets short runs move beta; the paper keeps the default
    grad_clip: float = 1.0           # max global grad norm (0 = off)
    grad_accum: int = 1              # micro-batches per optimiser step
    seed: int = 0
    attn_impl: str = "auto"          # training attention (trimkv.attention.IMPLS): auto = triton on CUDA, reference /
                                     # chunked (by length) on CPU | reference | chunked | triton | flex
    gradient_checkpointing: bool = False  # non-reentrant activation checkpointing of the frozen layers
    bf16: bool = True                # bf16 autocast on GPU (ignored on CPU)
    device: str = "auto"             # auto | cpu | cuda
    log_every: int = 1               # steps between metric lines
    engine: str = "auto"             # auto (ddp under torchrun, else plain) | plain | ddp | deepspeed
    zero_stage: int = 2              # DeepSpeed ZeRO stage: 2 (default) | 3 (frozen base too big for one GPU) | 1
    ds_config: str | None = None     # DeepSpeed JSON (e.g. launch/ds_zero3_offload.json); None = built from zero_stage
    save_every: int = 0              # steps between training checkpoints in <run_dir>/checkpoints (0 = never)
    keep_last: int = 2               # training checkpoints to keep (oldest deleted first)
    resume: bool = False             # continue from the newest valid training checkpoint of run_dir


@dataclass
class OutputSection:
    run_dir: str = "runs/default"    # metrics.jsonl, resolved recipe, training state
    checkpoint: str | None = None    # where the exported gate checkpoint goes (default: <run_dir>/gates)
    push_to_hub: str | None = None   # Hub repo id ("user/name"): the exported gates are pushed there after training
    push_checkpoints: bool = False   # also push the gates at every training checkpoint (one Hub commit per save)
    hub_private: bool = False        # create the Hub repo private
    license: str | None = "apache-2.0"  # Hub license id written into the model card (match the base model's terms)


@dataclass
class LoggingSection:
    wandb: str = "disabled"          # disabled | offline | online
    tensorboard: bool = False        # also write TensorBoard events to <run_dir>/tensorboard (pip install 'trimkv-gates[tensorboard]')
    project: str = "trimkv"
    run_name: str | None = None


@dataclass
class TraceSection(TraceSettings):
    """``trimkv trace``'s inputs beside the model and data sections: the fields of
    :class:`~trimkv.trace.settings.TraceSettings` (rows, layers, hidden_layers, targets, horizons, dtype, shard_rows,
    query_chunk, recon_prompt), and ``out``, the store's folder (``--out`` overrides it)."""

    out: str | None = None


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    gates: GatesSection = field(default_factory=GatesSection)
    data: Any = None                 # trimkv.data.DataConfig
    loss: LossSection = field(default_factory=LossSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    output: OutputSection = field(default_factory=OutputSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    trace: TraceSection = field(default_factory=TraceSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def checkpoint_dir(self) -> Path:
        return Path(self.output.checkpoint or Path(self.output.run_dir) / "gates")


# Lists of names are owned by the modules that implement them; validation reads them from there.
_CHOICES = {
    ("model", "dtype"): DTYPE_CHOICES,
    ("gates", "gate_type"): GATE_TYPES,
    ("gates", "activation"): ACTIVATIONS,
    ("loss", "capacity_form"): CAPACITY_FORMS,
    ("loss", "capacity_scope"): CAPACITY_SCOPES,
    ("train", "attn_impl"): IMPLS,
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("train", "engine"): ENGINES,
    ("train", "zero_stage"): (1, 2, 3),
    ("logging", "wandb"): ("disabled", "offline", "online"),
}
_POSITIVE = {("loss", "budget"), ("loss", "chunk_size"), ("train", "steps"), ("train", "grad_accum"),
             ("gates", "gate_hidden"), ("train", "log_every"), ("train", "keep_last"), ("data", "batch_size"),
             ("data", "seq_len"), ("data", "max_samples"), ("train", "lr"), ("train", "adam_eps"), ("lora", "r")}
_MAXIMUM = {("gates", "gate_hidden"): MAX_GATE_HIDDEN, ("lora", "r"): MAX_GATE_HIDDEN, ("loss", "budget"): MAX_TOKENS,
            ("loss", "chunk_size"): MAX_TOKENS, ("data", "seq_len"): MAX_TOKENS, ("train", "grad_accum"): 1 << 16,
            ("data", "batch_size"): 1 << 16}   # plausibility; memory is checked once the model is known
_NON_NEGATIVE = {("train", "save_every"), ("train", "warmup_steps"), ("train", "grad_clip"), ("train", "min_lr"),
                 ("train", "weight_decay"), ("gates", "init_std"), ("loss", "kl_weight"), ("loss", "ntp_weight"),
                 ("loss", "capacity_weight"), ("lora", "alpha"), ("lora", "dropout"), ("lora", "lr")}


def _section(cls, raw: Any, name: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe section '{name}' must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(raw, fields, "field", prefix=f"{name}.")
    hints = typing.get_type_hints(cls)
    values = {key: _coerce(name, key, val, hints[key]) for key, val in raw.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"recipe section '{name}': {err}") from err


def _reject_unknown(keys, valid, what: str, *, prefix: str = "") -> None:
    """Raise naming the first key not in ``valid``, with the closest valid name as a hint.

    ``what`` names one key ("field", "recipe section"); its last word, pluralised, heads the list of valid names.
    """
    for key in keys:
        if key not in valid:
            hint = difflib.get_close_matches(key, valid, n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            noun = what.rsplit(" ", 1)[-1]
            raise RecipeError(f"unknown {what} '{prefix}{key}'{extra}; valid {noun}s: {sorted(valid)}")


def _coerce(section: str, key: str, val: Any, typ: Any) -> Any:
    """Check ``val`` against the field's type (YAML reads 2e-4 as a string: numbers are coerced), its choices and
    its range; raise RecipeError naming the field, the value and what it must be."""
    name = f"'{section}.{key}'"
    args = typing.get_args(typ)
    if val is None:
        if type(None) in args:
            return None
        raise RecipeError(f"{name} must be set (it has no 'null' value)")
    base = next((a for a in args if a is not type(None)), typ) if args and type(None) in args else typ
    if base is bool:
        if not isinstance(val, bool):
            raise RecipeError(f"{name} must be true or false, got {val!r} (YAML: write true / false, unquoted)")
    elif base in (int, float):
        val = _number(name, val, integer=base is int)
    elif base is str:
        if not isinstance(val, str):
            raise RecipeError(f"{name} must be a string, got {type(val).__name__} {val!r}")
    elif typing.get_origin(base) is tuple and typing.get_args(base)[-1] is Ellipsis:   # names, any number of them
        if typing.get_args(base)[0] is int:                                             # or integers
            if not isinstance(val, (list, tuple)):
                raise RecipeError(f"{name} must be a list of integers, got {val!r}")
            val = tuple(_number(name, v, integer=True) for v in val)
        elif not isinstance(val, (list, tuple)) or not all(isinstance(v, str) for v in val):
            raise RecipeError(f"{name} must be a list of names, got {val!r}")
        else:
            val = tuple(val)
    elif typing.get_origin(base) is tuple:
        if not isinstance(val, (list, tuple)) or len(val) != len(typing.get_args(base)):
            raise RecipeError(f"{name} must be a list of {len(typing.get_args(base))} numbers, got {val!r}")
        val = tuple(_number(name, v, integer=False) for v in val)
    choices = _CHOICES.get((section, key))
    if choices and val not in choices:
        raise RecipeError(f"{name} = {val!r} is not one of {choices}")
    if (section, key) in _POSITIVE and not val > 0:
        raise RecipeError(f"{name} must be positive (> 0), got {val!r}")
    if (section, key) in _NON_NEGATIVE and val < 0:
        raise RecipeError(f"{name} must be >= 0, got {val!r}")
    if (section, key) in _MAXIMUM and val > _MAXIMUM[section, key]:
        raise RecipeError(f"{name} = {val:,} is above the limit {_MAXIMUM[section, key]:,}: a typo?")
    if (section, key) == ("lora", "dropout") and val >= 1:
        raise RecipeError(f"'lora.dropout' must be below 1, got {val!r}")
    if (section, key) == ("lora", "target_modules") and not val:
        raise RecipeError("'lora.target_modules' names no module: list the projections to adapt (e.g. [q_proj, v_proj])")
    return val


def _number(name: str, val: Any, *, integer: bool) -> int | float:
    """A finite number (an integer when ``integer``) from a YAML value; bools and strings that are no number
    are refused."""
    num = None
    if not isinstance(val, bool):
        try:
            num = float(val)
        except (TypeError, ValueError):
            pass
    if num is None:
        raise RecipeError(f"{name} must be a number, got {val!r}")
    if not math.isfinite(num):
        raise RecipeError(f"{name} must be a finite number, got {val!r}")
    if integer:
        if not num.is_integer():   # 2.5 steps must not silently become 2
            raise RecipeError(f"{name} must be an integer, got {val!r}")
        return int(num)
    return num


def parse_recipe(raw: dict[str, Any]) -> Recipe:
    """Validate a recipe given as a dict (e.g. parsed YAML)."""
    if not isinstance(raw, dict):
        raise RecipeError("a recipe must be a YAML mapping with sections model/gates/data/loss/lora/train/output/logging")
    sections = {f.name: f for f in dataclasses.fields(Recipe)}
    _reject_unknown(raw, sections, "recipe section")
    if "data" not in raw:
        raise RecipeError("recipe has no 'data' section; set at least data.source (e.g. 'builtin:prose')")
    classes = dict(model=ModelSection, gates=GatesSection, data=DataConfig, loss=LossSection, lora=LoraSection,
                   train=TrainSection, output=OutputSection, logging=LoggingSection, trace=TraceSection)
    recipe = Recipe(**{name: _section(cls, raw.get(name), name) for name, cls in classes.items()})
    _check_across_fields(recipe)
    return recipe


def _check_across_fields(recipe: Recipe) -> None:
    t = recipe.train
    if t.min_lr > t.lr:
        raise RecipeError(f"'train.min_lr' = {t.min_lr} is above 'train.lr' = {t.lr}: the cosine schedule decays from "
                          "lr to min_lr; lower min_lr")
    if not all(0 <= b < 1 for b in t.betas):
        raise RecipeError(f"'train.betas' = {list(t.betas)} must both be in [0, 1)")
    if t.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("'train.device' = 'cuda' but torch sees no CUDA GPU here (a CPU build of torch, or no "
                          "driver): use 'auto' (CUDA when available, else CPU) or 'cpu'")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML; ``overrides`` like ``["train.steps=10", "loss.budget=64"]`` are applied first. Every
    problem is a RecipeError naming the file (and the line) or the override."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist" + (" (it is a folder)" if path.is_dir() else "")
                          + " (recipes live in recipes/*.yaml)")
    raw_bytes = path.read_bytes()
    if len(raw_bytes) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path} holds {len(raw_bytes):,} bytes; a recipe is a few kilobytes of YAML: wrong file?")
    text = decode_utf8(raw_bytes, path, RecipeError, "save the recipe as UTF-8")
    raw = _yaml(text, where=str(path)) or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping with sections "
                          f"{'/'.join(f.name for f in dataclasses.fields(Recipe))}, got {type(raw).__name__}")
    for item in overrides or []:
        apply_override(raw, item)
    try:
        return parse_recipe(raw)
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None


def _yaml(text: str, *, where: str, lines: bool = True) -> Any:
    """``yaml.safe_load(text)``; a RecipeError naming ``where``, the line (``lines``) and the column otherwise."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        at = "" if mark is None else f":{mark.line + 1}:{mark.column + 1}" if lines else f" (column {mark.column + 1})"
        what = "; ".join(p for p in (err.context, err.problem) if p)
        raise RecipeError(f"{where}{at}: not valid YAML ({what})") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{where}: not valid YAML ({' '.join(str(err).split())})") from None
    except RecursionError:
        raise RecipeError(f"{where}: nested too deeply to be a recipe") from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """``"section.field=value"`` (value parsed as YAML) into the raw recipe dict."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise RecipeError(f"override {item!r} must look like section.field=value (e.g. train.steps=10)")
    dotted, value = item.split("=", 1)
    section, key = dotted.split(".", 1)
    raw.setdefault(section, {})
    if raw[section] is None:
        raw[section] = {}
    if not isinstance(raw[section], dict):
        raise RecipeError(f"cannot override {dotted}: section '{section}' is not a mapping")
    try:
        raw[section][key] = _yaml(value, where=f"--set {item}: the value {value!r}", lines=False)
    except RecipeError as err:
        raise RecipeError(f"{err}; the value after '=' is read as YAML: quote text that is not a number, a list or "
                          f"true/false, e.g. --set {dotted}=\"'...'\"") from None


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(_plain(recipe.to_dict()), sort_keys=False))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# Fields a resumed run may change: they do not alter what the saved optimiser state, gates and data position mean.
RESUMABLE_CHANGES = {("train", "steps"), ("train", "log_every"), ("train", "save_every"), ("train", "keep_last"),
                     ("train", "resume"), ("train", "device"), ("output", "checkpoint"), ("logging", "wandb"),
                     ("logging", "project"), ("logging", "run_name"), ("logging", "tensorboard"),
                     ("output", "push_to_hub"), ("output", "push_checkpoints"), ("output", "hub_private"),
                     ("output", "license")} | {("trace", f.name) for f in dataclasses.fields(TraceSection)}


def recipe_changes(old: Recipe, new: Recipe) -> list[str]:
    """``["section.field: old -> new", ...]`` for every field that differs and may not change on resume."""
    a, b = _flat(old.to_dict()), _flat(new.to_dict())
    return [f"{'.'.join(k)}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k[:2] not in RESUMABLE_CHANGES]


def _flat(d: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    out: dict[tuple, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = list(v) if isinstance(v, tuple) else v
    return out
