"""Training recipes: YAML files in ``recipes/`` parsed into dataclasses and validated once, up front.

A recipe has seven sections (``lora`` is optional); every field is documented on its dataclass below. An unknown or mistyped field
raises :class:`RecipeError` naming it (and the close matches), so a typo never silently falls back to a default.

    model:   which frozen base model to load
    gates:   gate architecture (trimkv.gate.GateConfig fields)
    data:    training data (trimkv.data.DataConfig fields)
    loss:    memory budget M and loss weights
    lora:    optional LoRA adapters on the attention projections, co-trained with the gates (trimkv.lora)
    train:   optimiser, schedule, steps
    output:  where runs, logs and the exported gate checkpoint go
    logging: wandb mode / project
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .attention import IMPLS
from .train.engines import ENGINES
from .errors import RecipeError
from .gate import GATE_TYPES
from .lora import DEFAULT_TARGETS
from .losses import CAPACITY_FORMS, CAPACITY_SCOPES
from .models import DTYPES




@dataclass
class ModelSection:
    name: str = "smollm2"            # "smollm2" = the embedded SmolLM2-135M-Instruct; or a Hub id / local folder
    revision: str | None = None      # Hub revision of the base model
    dtype: str = "float32"           # weights dtype: float32 | bfloat16 | float16
    gguf_file: str | None = None     # load a GGUF file from `name` (a folder) with transformers' gguf_file=
    trust_remote_code: bool = False  # only if you trust the model repository's code


@dataclass
class GatesSection:
    gate_type: str = "rg"            # trimkv.gate.GATE_TYPES: "rg" (attention input) | "rg2" (post-RoPE [k; v]) |
                                     # "rg10" (DBTrimKV: two-layer body, final projection + bias shared by all layers)
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


@dataclass
class LoggingSection:
    wandb: str = "disabled"          # disabled | offline | online
    project: str = "trimkv"
    run_name: str | None = None


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def checkpoint_dir(self) -> Path:
        return Path(self.output.checkpoint or Path(self.output.run_dir) / "gates")


# Lists of names are owned by the modules that implement them; validation reads them from there.
_CHOICES = {
    ("model", "dtype"): tuple(DTYPES),
    ("gates", "gate_type"): GATE_TYPES,
    ("loss", "capacity_form"): CAPACITY_FORMS,
    ("loss", "capacity_scope"): CAPACITY_SCOPES,
    ("train", "attn_impl"): IMPLS,
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("train", "engine"): ENGINES,
    ("train", "zero_stage"): (1, 2, 3),
    ("logging", "wandb"): ("disabled", "offline", "online"),
}
_POSITIVE = {("loss", "budget"), ("loss", "chunk_size"), ("train", "steps"), ("train", "grad_accum"),
             ("gates", "gate_hidden"), ("train", "log_every"), ("train", "keep_last"), ("lora", "r")}
_NON_NEGATIVE = {("train", "save_every"), ("train", "warmup_steps"), ("train", "grad_clip"), ("train", "lr"),
                 ("train", "min_lr"), ("train", "weight_decay"), ("lora", "alpha"), ("lora", "dropout"),
                 ("lora", "lr")}


def _section(cls, raw: Any, name: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe section '{name}' must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(raw, fields, "field", prefix=f"{name}.")
    values = {}
    for key, val in raw.items():
        default = getattr(cls(), key) if cls is not _data_config() else None
        values[key] = _coerce(name, key, val, default)
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


def _coerce(section: str, key: str, val: Any, default: Any) -> Any:
    """YAML reads 2e-4 as a string; coerce to the default's type and check choices / signs."""
    if isinstance(default, bool):
        if not isinstance(val, bool):
            raise RecipeError(f"'{section}.{key}' must be true or false, got {val!r}")
    elif isinstance(default, (int, float)) and val is not None:
        try:
            num = float(val) if not isinstance(val, bool) else None
        except (TypeError, ValueError):
            num = None
        if num is None:
            raise RecipeError(f"'{section}.{key}' must be a number, got {val!r}")
        if not isinstance(default, float) and not num.is_integer():   # 2.5 steps must not silently become 2
            raise RecipeError(f"'{section}.{key}' must be an integer, got {val!r}")
        val = num if isinstance(default, float) else int(num)
    elif isinstance(default, tuple) and isinstance(val, list):
        kind = type(default[0]) if default else str
        if kind is str and not all(isinstance(v, str) for v in val):
            raise RecipeError(f"'{section}.{key}' must be a list of names, got {val!r}")
        val = tuple(kind(v) for v in val)
    choices = _CHOICES.get((section, key))
    if choices and val not in choices:
        raise RecipeError(f"'{section}.{key}' = {val!r} is not one of {choices}")
    if (section, key) in _POSITIVE and (not isinstance(val, int) or val < 1):
        raise RecipeError(f"'{section}.{key}' must be a positive integer, got {val!r}")
    if (section, key) in _NON_NEGATIVE and val < 0:
        raise RecipeError(f"'{section}.{key}' must be >= 0, got {val!r}")
    if (section, key) == ("lora", "dropout") and val >= 1:
        raise RecipeError(f"'lora.dropout' must be below 1, got {val!r}")
    if (section, key) == ("lora", "target_modules") and not val:
        raise RecipeError("'lora.target_modules' names no module: list the projections to adapt (e.g. [q_proj, v_proj])")
    return val


def _data_config():
    from .data import DataConfig

    return DataConfig


def parse_recipe(raw: dict[str, Any]) -> Recipe:
    """Validate a recipe given as a dict (e.g. parsed YAML)."""
    if not isinstance(raw, dict):
        raise RecipeError("a recipe must be a YAML mapping with sections model/gates/data/loss/lora/train/output/logging")
    sections = {f.name: f for f in dataclasses.fields(Recipe)}
    _reject_unknown(raw, sections, "recipe section")
    if "data" not in raw:
        raise RecipeError("recipe has no 'data' section; set at least data.source (e.g. 'builtin:prose')")
    classes = dict(model=ModelSection, gates=GatesSection, data=_data_config(), loss=LossSection, lora=LoraSection,
                   train=TrainSection, output=OutputSection, logging=LoggingSection)
    return Recipe(**{name: _section(cls, raw.get(name), name) for name, cls in classes.items()})


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML; ``overrides`` like ``["train.steps=10", "loss.budget=64"]`` are applied first."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist (recipes live in recipes/*.yaml)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {err}") from err
    for item in overrides or []:
        apply_override(raw, item)
    return parse_recipe(raw)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """``"section.field=value"`` (value parsed as YAML) into the raw recipe dict."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise RecipeError(f"override {item!r} must look like section.field=value (e.g. train.steps=10)")
    dotted, value = item.split("=", 1)
    section, key = dotted.split(".", 1)
    raw.setdefault(section, {})
    if not isinstance(raw[section], dict):
        raise RecipeError(f"cannot override {dotted}: section '{section}' is not a mapping")
    raw[section][key] = yaml.safe_load(value)


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(_plain(recipe.to_dict()), sort_keys=False))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
