"""Model cards of gate checkpoints (``huggingface_hub.ModelCard``): Hub metadata (license, base model, datasets,
``model-index`` eval results as ``EvalResult``), a readable summary, and a usage snippet that runs as written.

    write_model_card(folder / "README.md", config, metadata)          # at save time
    refresh_model_card(folder / "README.md", config, source="user/repo", eval_records=records)   # before a push

``metadata`` is a free-form dict shown as a list, except for three keys that go into the front matter: ``license``
(a Hub license id), ``datasets`` (Hub dataset ids) and ``eval_records`` (records of ``trimkv eval``, see
:func:`eval_results`). Cards and configs publish Hub ids or folder names, never absolute local paths
(:func:`public_name`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..base_model import DEFAULT_MODEL, DEFAULT_WEIGHTS, is_default_model
from ..gate import SHARED_HEAD_TYPES, GateConfig

FRONT_KEYS = ("license", "datasets", "eval_records")   # metadata keys that go into the front matter
EVAL_HEADING = "## Evaluation results"
USAGE_HEADING = "## Usage"
_LOCAL_PATH = re.compile(r"(?<![\w.:/-])(?:~|\.{1,2})?/[^\s,;()'\"`]+")


# ------------------------------------------------------------------------------------------ public names


def public_name(text: str | os.PathLike | None) -> str | None:
    """What a checkpoint may publish about a base model, a data source or any text: Hub ids as they are, every local
    path (absolute, ``~/``, ``./``, ``../``) by its last component only (a card or config.json on the Hub never shows
    where files lived on someone's machine)."""
    if text is None:
        return None
    return _LOCAL_PATH.sub(lambda m: pathlib.PurePath(os.path.expanduser(m.group(0))).name or m.group(0), str(text))


def public_value(value: Any) -> Any:
    """:func:`public_name` applied to every string inside ``value`` (dicts, lists)."""
    if isinstance(value, str):
        return public_name(value)
    if isinstance(value, dict):
        return {k: public_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(public_value(v) for v in value)
    return value


def public_config(config: GateConfig) -> GateConfig:
    """A copy of ``config`` whose names (base model, how to load it, where it was converted from) are public."""
    load = dict(config.base_load_kwargs)
    if "name" in load:
        load["name"] = public_name(load["name"])
    extra = dict(config.extra)
    if isinstance(extra.get("converted_from"), str):
        extra["converted_from"] = public_name(extra["converted_from"])
    return dataclasses.replace(config, base_model=public_name(config.base_model), base_load_kwargs=load, extra=extra)


# --------------------------------------------------------------------------------------------- writing


def write_model_card(path: str | os.PathLike, config: GateConfig, metadata: dict | None = None, *,
                     source: str | None = None, parameters: int | None = None,
                     version: str = "unknown") -> pathlib.Path:
    """Write a README.md model card (a ``huggingface_hub.ModelCard``) to ``path``. ``source`` is what the usage
    snippet passes to ``load_gates`` (a Hub id or folder; default: the folder the card is in)."""
    path = pathlib.Path(path)
    metadata = dict(metadata or {})
    source = source or public_name(path.parent)
    body = "\n".join([_card_body(config, parameters, version), _metadata_section(metadata),
                      eval_section(metadata.get("eval_records")), usage(config, source)])
    return _save(ModelCard.from_template(card_data(config, metadata, name=source), template_str=_TEMPLATE,
                                         body=body.rstrip()), path)


def refresh_model_card(path: str | os.PathLike, config: GateConfig, *, source: str,
                       eval_records: list[dict] | None = None) -> pathlib.Path:
    """Rewrite the parts of an existing card that depend on where it is published and what was measured: the usage
    snippet, and with ``eval_records`` the front matter's ``model-index`` and the evaluation section. Everything
    else is kept."""
    path = pathlib.Path(path)
    old = ModelCard(path.read_text(encoding="utf-8")) if path.is_file() else ModelCard("")
    body = old.text
    cut = (EVAL_HEADING, USAGE_HEADING) if eval_records is not None else (USAGE_HEADING,)
    for heading in cut:
        if heading in body:
            body = body[:body.index(heading)]
    parts = [body.strip() + "\n"]
    data = old.data
    if eval_records is not None:
        keep = {k: v for k, v in old.data.to_dict().items() if k != "model-index"}
        meta = {k: keep[k] for k in ("license", "datasets") if k in keep}
        data = card_data(config, {**meta, "eval_records": eval_records}, name=source, keep=keep)
        parts.append(eval_section(eval_records))
    parts.append(usage(config, source))
    return _save(ModelCard.from_template(data, template_str=_TEMPLATE, body="\n".join(parts).strip()), path)


def split_front_matter(text: str) -> tuple[dict, str]:
    """(``{"license", "datasets", "_raw": the whole front matter}``, body) of a card's text."""
    card = ModelCard(text)
    raw = card.data.to_dict()
    meta = {k: raw[k] for k in ("license", "datasets") if k in raw}
    return {**meta, "_raw": raw}, card.text.lstrip("\n")


_TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}\n"


def _save(card: ModelCard, path: pathlib.Path) -> pathlib.Path:
    path.write_text(str(card).rstrip() + "\n", encoding="utf-8")
    return path


def card_data(config: GateConfig, metadata: dict, *, name: str, keep: dict | None = None) -> ModelCardData:
    """The card's Hub metadata: library, license, base model, datasets, tags and ``model-index`` eval results (the
    records of these gates). ``keep``: fields of an earlier card kept as they were."""
    data: dict[str, Any] = {k: v for k, v in (keep or {}).items() if k != "model-index"}
    data["library_name"] = "trimkv"
    if metadata.get("license"):
        data["license"] = metadata["license"]
    if config.base_model:
        data["base_model"] = public_name(config.base_model)
    if metadata.get("datasets"):
        data["datasets"] = list(metadata["datasets"])
    data.setdefault("tags", ["trimkv", "kv-cache"])
    results = eval_results(metadata.get("eval_records") or [])
    if results:
        data.update(model_name=name, eval_results=results)
    return ModelCardData(**data)


def front_matter(config: GateConfig, metadata: dict, *, name: str, keep: dict | None = None) -> str:
    """:func:`card_data` as the YAML block at the top of a README.md."""
    return "---\n" + card_data(config, metadata, name=name, keep=keep).to_yaml() + "\n---\n"


def _card_body(config: GateConfig, parameters: int | None, version: str) -> str:
    base = public_name(config.base_model) or "an unrecorded base model"
    revision = f" (revision `{config.base_revision}`)" if config.base_revision else ""
    budget = f"{config.train_budget} tokens" if config.train_budget else "not recorded"
    weights = ", ".join(f"{k}={v}" for k, v in config.loss_weights.items()) or "not recorded"
    rows = [
        ("Base model", f"`{base}`{revision}"),
        ("Gate type", f"`{config.gate_type}` ({config.activation})" + (
            "; final projection and bias shared by all layers" if config.gate_type in SHARED_HEAD_TYPES else "")),
        ("Layers", config.num_layers),
        ("KV heads per layer", config.num_kv_heads),
        ("Hidden size / head dim", f"{config.hidden_size} / {config.head_dim}"),
        ("Gate MLP hidden size", config.gate_hidden),
        ("Gate parameters", f"{parameters if parameters is not None else config.num_parameters():,}"),
        ("Training KV budget M", budget),
        ("Loss weights", weights),
        ("trimkv version", version),
    ]
    if config.extra.get("base_weights"):      # what the base weights really are (the embedded default: a GGUF)
        rows.insert(1, ("Base weights", public_name(str(config.extra["base_weights"]))))
    if config.extra.get("converted_from"):
        rows.append(("Converted from", f"`{public_name(config.extra['converted_from'])}` (the authors' release)"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (
        f"# TRIM-KV retention gates for {base}\n\n"
        "Learned retention gates ([TRIM-KV](https://arxiv.org/abs/2512.03324)) for a frozen base model: "
        "one small MLP per decoder layer scores how long each token stays in a memory-bounded KV cache. "
        "The base model's weights are not included.\n\n"
        f"| | |\n|---|---|\n{table}\n"
    )


def _metadata_section(metadata: dict) -> str:
    shown = {k: v for k, v in metadata.items() if k not in FRONT_KEYS}
    if not shown:
        return ""
    lines = ["## Training and evaluation", ""]
    for key, value in shown.items():
        text = value if isinstance(value, (str, int, float)) else json.dumps(value, default=str)
        lines.append(f"- **{key}**: {public_name(str(text))}")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------- eval results


def eval_results(records: list[dict]) -> list[EvalResult]:
    """Hub ``model-index`` results (``huggingface_hub.EvalResult``) from ``trimkv eval`` records (``metrics.json`` /
    ``fidelity.json`` rows) of the ``trimkv`` policy: one accuracy per (task, length, budget), one KL per budget for
    long-text fidelity (the Hub groups them by task and dataset)."""
    out = []
    for r in records:
        if r.get("policy") != "trimkv" or r.get("budget") is None:
            continue
        if "task" in r:
            out.append(EvalResult(
                task_type="text-generation", task_name="Long-context retrieval (RULER-style, trimkv eval)",
                dataset_type=f"trimkv-{r['task']}", dataset_name=f"{r['task']}, {r['length']} tokens (generated offline)",
                metric_type="accuracy", metric_name=f"{r['task']} accuracy at M={r['budget']} (n={r.get('n')})",
                metric_value=round(100 * float(r["score"]), 2)))
        elif "kl" in r:
            out.append(EvalResult(
                task_type="text-generation", task_name="Long-text fidelity vs the full cache",
                dataset_type="trimkv-prose", dataset_name="eval-split prose (trimkv eval --fidelity)",
                metric_type="kl_divergence", metric_name=f"KL(full || bounded) at M={r['budget']}",
                metric_value=round(float(r["kl"]), 4)))
    return out


def eval_section(records: list[dict] | None) -> str:
    """A Markdown table of the ``trimkv`` records beside the full cache's, when there are any."""
    mine = [r for r in records or [] if r.get("policy") == "trimkv" and r.get("budget") is not None]
    if not mine:
        return ""
    full = {(r.get("task"), r.get("length")): r["score"] for r in records if r.get("policy") == "full" and "score" in r}
    lines = [EVAL_HEADING, "", "Measured with `trimkv eval` (same cache, schedule and scoring for every policy).", "",
             "| task | length | M | trimkv | full cache |", "|---|---|---|---|---|"]
    for r in mine:
        if "task" in r:
            ref = full.get((r["task"], r["length"]))
            lines.append(f"| {r['task']} | {r['length']} | {r['budget']} | {100 * r['score']:.1f}% | "
                         f"{'' if ref is None else f'{100 * ref:.1f}%'} |")
        elif "kl" in r:
            lines.append(f"| fidelity (KL, top-1) | {r.get('prefix_tokens')} + {r.get('continuation_tokens')} | "
                         f"{r['budget']} | {r['kl']:.4f}, {100 * r['top1']:.1f}% | 0, 100% |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- usage


def base_load_kwargs(config: GateConfig) -> dict[str, Any] | None:
    """``trimkv.base_model.load_model`` arguments that rebuild the base model; None when the config does not say."""
    if config.base_load_kwargs:
        return dict(config.base_load_kwargs)
    if is_default_model(config.base_model):       # the embedded default (checkpoints written before the field too)
        return {"name": DEFAULT_MODEL}
    if config.base_model:
        return {"name": config.base_model, **({"revision": config.base_revision} if config.base_revision else {})}
    return None


SNIPPET_KEYS = ("name", "revision", "gguf_file")   # load_model arguments a card's usage snippet may show


def usage(config: GateConfig, source: str) -> str:
    """A snippet that runs as written: load the base model, attach these gates, answer with a bounded cache.

    It is published code built from a checkpoint's config.json, so nothing from there reaches it as code: only the
    :data:`SNIPPET_KEYS` of ``base_load_kwargs`` with string values (written as Python string literals by ``repr``),
    other keys and values are dropped; the budget is an integer or the default."""
    load = 'load_model("<the base model these gates were trained for>")'
    kwargs = {k: v for k, v in (base_load_kwargs(config) or {}).items() if k in SNIPPET_KEYS and isinstance(v, str)}
    if "name" in kwargs:
        args = [repr(public_name(kwargs.pop("name"))), *(f"{k}={kwargs[k]!r}" for k in SNIPPET_KEYS if k in kwargs)]
        load = "load_model(" + ", ".join(args) + ")"
    budget = config.train_budget
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        budget = 512
    return (
        f"{USAGE_HEADING}\n\n```python\n"
        "from trimkv import load_gates\n"
        "from trimkv.base_model import load_model\n"
        "from trimkv.serve import answer\n\n"
        f"model, tok = {load}   # the base model; add device=\"cuda\" on a GPU\n"
        f"load_gates(model, {str(source)!r})\n"
        'out = answer(model, tok, context="<a long document>", questions=["<a question about it>"], '
        f"budget={int(budget)})\n"
        'print(out.answers[0], out.kv_bytes, "bytes of KV")\n```\n'
    )
