"""The evaluation harness: every (task, length, budget, policy) cell judged with the same cache, schedule and scoring.

    run_eval(model, tokenizer, tasks=["passkey"], lengths=[2048], budgets=[32, 64, 128],
             policies=["full", "trimkv", "streaming", "h2o"], n_samples=20, gates="checkpoints/smollm2",
             out_dir="results/")

Every policy runs in a cache made by :func:`trimkv.serve.make_cache` (same ``budget`` tokens per KV head, same
``sink`` and ``window`` protection, same chunked prefill of ``prefill_chunk`` tokens, greedy decoding through
:func:`trimkv.serve.generate`), so only the scoring rule differs; ``"full"`` is transformers' DynamicCache (no
eviction, budget ignored). ``"<policy>-global"`` (e.g. ``"trimkv-global"``) is that policy in one pool of
``budget * layers * KV heads`` slots (the same total memory; sink and window per head, a floor of 1 per head), as
DBTrimKV gates are served. ``head_budgets`` (an allocation folder or file of ``trimkv profile``, LU-KV) gives every
bounded per-head policy its own budget per (layer, KV head), the policy's shares scaled to each cell's budget (the
same total memory); such cells are separate cells (their key names the allocation) and their records carry
``head_budgets`` (the allocation's name). ``lookahead`` > 0 ranks the kept tokens of the TRIM-KV policies by DBTrimKV's future
utility over that many steps. Policies that read the gates need trained gates; which model a cell runs (gated or
frozen, LoRA adapters on or off) is the cache's business (:func:`trimkv.serve.gates_for`). ``"oracle"``
(:mod:`trimkv.eval.oracle`) is a diagnostic that is told where the needle is.

Outputs in ``out_dir``:
  * ``cells/<model>/<cell>.json``  - one finished cell: its settings, metrics and per-sample predictions. A rerun
    with the same (model, task, length, budget, policy, n, seed) and the same settings skips it.
  * ``predictions.jsonl``          - one line per sample of every cell run into this folder.
  * ``metrics.json``               - one record per cell run into this folder (mean score, seconds, KV bytes, ...):
    several runs with different grids (e.g. the baselines at one budget only) add up; a cell run again replaces
    its record, identified by (task, length, budget, policy).
  * ``results.md``                 - a Markdown table of them: rows (task, length, policy), columns budgets.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from trimkv.errors import DataError
from trimkv.eval.oracle import NeedleOraclePolicy
from trimkv.eval.tasks import TASK_METRIC, TASKS, make_samples, render_prompt, score
from trimkv.lora import adapter_state_dict
from trimkv.base_model import input_device
from trimkv.names import EVAL_POLICY_NAMES, check_names
from trimkv.progress import Progress
from trimkv.serve import FULL, BoundedCache, generate, make_cache
from trimkv.serve.budgets import allocation_path, load_allocation
from trimkv.serve.factory import budget_nbytes
from trimkv.serve.laq_lookahead import LookaheadLAQ
from trimkv.serve.policies import POLICIES, parse_policy

GLOBAL = "trimkv-global"   # the trained gates in one pool for all layers and heads (scope "global")
ORACLE = "oracle"     # keeps the needle sentences, then the most recent tokens: an upper bound (eval/oracle.py)
EVAL_POLICIES = {**POLICIES, "laq": LookaheadLAQ, ORACLE: NeedleOraclePolicy}   # LAQ: its lookahead per prompt
check_names("trimkv.eval.harness (full, policies, global, oracle)", [FULL, *POLICIES, GLOBAL, ORACLE], EVAL_POLICY_NAMES)
DEPTHS = (0.1, 0.9)   # needle depths are spread evenly over this range (the "depths 10%-90%")
# Enough new tokens for each task's answer plus a little wording around it.
MAX_NEW_TOKENS = {"passkey": 16, "multikey_needle": 20, "multivalue_needle": 64, "kv_retrieval": 48,
                  "variable_tracking": 40, "frequent_words": 32}


@dataclass(frozen=True)
class Cell:
    task: str
    length: int
    budget: int | None        # None = full cache
    policy: str

    @property
    def slug(self) -> str:
        return f"{self.task}-L{self.length}-{self.policy}-M{self.budget if self.budget is not None else 'full'}"


def policy_names() -> list[str]:
    return list(EVAL_POLICY_NAMES)


def uses_gates(spec: str) -> bool:
    """Whether policy ``spec`` (a name, ``"<name>-global"`` or ``"full"``) reads trained gates."""
    return spec != FULL and EVAL_POLICIES[parse_policy(spec)[0]].uses_gates


def uses_rankers(spec: str) -> bool:
    """Whether policy ``spec`` reads trained KVP rankers (``kvp``)."""
    return spec != FULL and getattr(EVAL_POLICIES[parse_policy(spec)[0]], "uses_rankers", False)


def prepared_rankers(model, kvp=None, *, need: bool = False):
    """The KVP rankers the cells read: ``kvp`` (a checkpoint folder / Hub id, loaded and checked against ``model``,
    or :class:`~trimkv.kvp.KVPRankers`) on the model's input device; None when no policy needs them."""
    if not need:
        return None
    if kvp is None:
        from trimkv.serve.policies.kvp import MISSING

        raise ValueError(MISSING)
    from trimkv.kvp import KVPRankers, load_rankers
    from trimkv.kvp.checkpoint import check_model

    if isinstance(kvp, KVPRankers):
        check_model(kvp.config, model)
        return kvp.to(input_device(model))
    return load_rankers(kvp, model, device=input_device(model))


# ----------------------------------------------------------------------------------------- gates and caches


@contextlib.contextmanager
def prepared_gates(model, gates=None, *, need_trained: bool = False) -> Iterator:
    """Yield the model's gate handle (None without gates): ``gates`` (a checkpoint path) loaded and attached, and
    detached on exit, or the gates already on the model. ``need_trained``: some policy reads the gates."""
    handle = getattr(model, "trimkv", None)
    if gates is not None:
        from trimkv.share import load_gates

        if handle is not None and handle.gates is not None:
            raise ValueError(f"the model already has gates attached, and gates={str(gates)!r} was given too: pass "
                             "gates=None to evaluate the attached ones, or detach them first (model.trimkv.detach())")
        handle = load_gates(model, gates)
        try:
            yield handle
        finally:
            handle.detach()
        return
    if need_trained and (handle is None or handle.gates is None):
        raise ValueError("policy 'trimkv' needs trained gates: pass gates=<checkpoint folder> (CLI: --gates) "
                         "or attach them first with trimkv.load_gates(model, path)")
    yield handle


def policy_cache(model, spec: str, budget: int | None, *, sink: int, window: int, lookahead: int = 0,
                 head_budgets=None, **context):
    """A fresh cache for one prompt: ``spec`` is a policy name, ``"<name>-global"`` or ``"full"``; ``context`` is what
    the policy may read of the prompt (``seed``, ``sample``, ``prompt``, ``tokenizer``: the oracle's needle;
    ``prefill_chunk``). The policy's ``for_prompt`` also gets the model and the cache's ``budget``, ``sink`` and
    ``window`` (LAQ runs its pseudo lookahead decoding with them). ``head_budgets``: see
    :func:`trimkv.serve.make_cache`."""
    if spec == FULL:
        return make_cache(model, FULL)
    if budget is None:
        raise ValueError(f"policy {spec!r} needs a budget (tokens per KV head)")
    name, scope = parse_policy(spec)
    if lookahead and not uses_gates(spec):
        raise ValueError(f"lookahead={lookahead} applies to the TRIM-KV policies, not {spec!r}")
    policy = EVAL_POLICIES[name].for_prompt(lookahead=lookahead, model=model, budget=budget, sink=sink, window=window,
                                            **context)
    return make_cache(model, policy, budget, scope=scope, sink=sink, window=window, head_budgets=head_budgets)


def allocation_id(path) -> str:
    """What identifies an allocation in a cell's settings: its path and a digest of its contents."""
    data = allocation_path(path).read_bytes()
    return f"{path}#{hashlib.sha1(data).hexdigest()[:8]}"


def cell_allocation(cfg: dict):
    """The :class:`~trimkv.serve.budgets.HeadAllocation` a cell's settings name (None: uniform budgets)."""
    ident = cfg.get("head_budgets")
    return None if not ident else load_allocation(ident.rsplit("#", 1)[0])


def answer_occurrences(sample, prompt: str, tokenizer) -> list[list[list[int]]]:
    """For each answer of ``sample``: the token positions of each of its occurrences inside a needle sentence of
    ``prompt`` (``[]`` for tasks without needles)."""
    needles = sample.metadata.get("needles") or []
    zones = [(m.start(), m.end()) for n in needles for m in re.finditer(re.escape(n), prompt)]
    offsets = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    out = []
    for answer in sample.answers:
        occ = [[i for i, (a, b) in enumerate(offsets) if a < m.end() and b > m.start()]
               for m in re.finditer(re.escape(answer), prompt) if any(s <= m.start() < e for s, e in zones)]
        out.append([o for o in occ if o])
    return out if all(out) else []


def needle_kept(cache, occurrences: list[list[list[int]]], row: int = 0) -> int | None:
    """How many (layer, KV head) caches hold every answer in full (all tokens of at least one occurrence of each),
    batch row ``row``; None when the cache has no slots to look at or the task has no needles."""
    if not occurrences or not isinstance(cache, BoundedCache) or not cache.layers[0].is_initialized:
        return None
    held = 0
    for layer in cache.layers:
        for kept in layer.kept_positions()[row].tolist():                     # per KV head: kept positions
            kept = set(kept)
            held += all(any(set(occ) <= kept for occ in occs) for occs in occurrences)
    return held


# ----------------------------------------------------------------------------------------- the harness


def run_eval(model, tokenizer, *, tasks, lengths, budgets, policies, n_samples: int, out_dir, gates=None,
             seed: int = 0, sink: int = 4, window: int = 16, prefill_chunk: int = 256,
             max_new_tokens: int | None = None, haystack: str = "filler", chat: bool = False,
             depths: tuple[float, float] = DEPTHS, lookahead: int = 0, head_budgets=None, progress: bool = True,
             run_cell=None, kvp=None) -> list[dict]:
    """Evaluate every cell (see module docstring); returns the metrics records (also written to ``out_dir``).

    Sample i of a cell puts its needle at depth ``lo + (hi - lo) * i / (n - 1)`` for ``depths = (lo, hi)``.
    ``run_cell`` runs one unfinished cell (default: one prompt at a time; :mod:`trimkv.eval.batched` runs many).
    ``kvp``: the KVP rankers (checkpoint folder or :class:`~trimkv.kvp.KVPRankers`) the ``kvp`` policy reads."""
    run_cell = run_cell or _run_cell
    lo, hi = map(float, depths)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"depths={depths!r}: need 0 <= lo <= hi <= 1 (fractions of the haystack)")
    spread = [lo + (hi - lo) * i / (n_samples - 1) for i in range(n_samples)] if n_samples > 1 else [(lo + hi) / 2]
    tasks, policies = list(tasks), list(policies)
    _check_names(tasks, policies)
    budgets = sorted({int(b) for b in budgets})
    if any(p != FULL for p in policies) and not budgets:
        raise ValueError("give at least one budget (tokens per KV head) for the bounded-cache policies")
    out = Path(out_dir)
    model_name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    cells = [Cell(t, int(L), None if p == FULL else b, p) for t in tasks for L in lengths for p in policies
             for b in ([None] if p == FULL else budgets)]
    records: list[dict] = []
    predictions: list[dict] = []
    gated = any(uses_gates(p) for p in policies)
    rankers = prepared_rankers(model, kvp, need=any(uses_rankers(p) for p in policies))
    if rankers is not None:   # the cells' policies read them (handed over in the call, not stashed on the model)
        run_cell = functools.partial(run_cell, context={"kvp": rankers})
    with prepared_gates(model, gates, need_trained=gated) as handle:
        settings = dict(model=model_name, n=n_samples, seed=seed, sink=sink, window=window,
                        prefill_chunk=prefill_chunk, max_new_tokens=max_new_tokens, haystack=haystack, chat=chat,
                        depths=[lo, hi])
        if lookahead:   # settings added later enter the cell key only when set: earlier cells stay valid
            settings["lookahead"] = lookahead
        if head_budgets is not None and head_budgets != "uniform":
            settings["head_budgets"] = allocation_id(head_budgets)
        gate_id = gate_fingerprint(handle) if gated else None
        kvp_id = rankers.fingerprint() if rankers is not None else None
        todo, done = [], {}
        for cell in cells:
            cfg = _cell_settings(cell, settings, gate_id)
            if uses_rankers(cell.policy):   # a kvp cell names its rankers (others keep their earlier keys)
                cfg["kvp"] = kvp_id
            path = out / "cells" / _safe(model_name) / f"{cell.slug}-n{n_samples}-s{seed}-{_digest(cfg)}.json"
            if path.is_file():
                done[cell] = json.loads(path.read_text())
            else:
                todo.append((cell, cfg, path))
        samples = {}
        with Progress("eval", total=len(todo) * n_samples, enabled=progress) as bar:
            for cell, cfg, path in todo:
                key = (cell.task, cell.length)
                if key not in samples:
                    samples[key] = make_samples(cell.task, tokenizer, context_length=cell.length, n=n_samples,
                                                seed=seed, haystack=haystack, chat=chat, depths=spread)
                done[cell] = run_cell(model, tokenizer, cell, cfg, samples[key], bar)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(done[cell], indent=1))
    for cell in cells:   # a record names the gates (or rankers) it measured: two sets add up in one folder, and
        stamp = {"gates": done[cell]["settings"].get("gates")}         # model cards keep only their own gates' results
        if done[cell]["settings"].get("kvp"):
            stamp["kvp"] = done[cell]["settings"]["kvp"]
        records.append({**done[cell]["metrics"], **stamp})
        predictions += [{**row, **stamp} for row in done[cell]["predictions"]]
    _write_outputs(out, records, predictions)
    return records


def _run_cell(model, tokenizer, cell: Cell, cfg: dict, samples, bar, context: dict | None = None) -> dict:
    device = input_device(model)
    max_new = cfg["max_new_tokens"] or MAX_NEW_TOKENS.get(cell.task, 32)
    rows, t_cell = [], time.perf_counter()
    bar.update(label=cell.slug)
    allocation = cell_allocation(cfg)
    for i, sample in enumerate(samples):
        prompt = render_prompt(sample, tokenizer)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        t_policy = time.perf_counter()      # a sample's seconds include building its policy (LAQ decodes for it)
        cache = policy_cache(model, cell.policy, cell.budget, sink=cfg["sink"], window=cfg["window"],
                             lookahead=cfg.get("lookahead", 0), head_budgets=allocation, seed=cfg["seed"] * 1000 + i,
                             sample=sample, prompt=prompt, tokenizer=tokenizer, prefill_chunk=cfg["prefill_chunk"],
                             **(context or {}))
        t_policy = time.perf_counter() - t_policy
        gen = generate(model, tokenizer, ids, cache=cache, prefill_chunk=cfg["prefill_chunk"],
                       max_new_tokens=max_new)
        kept = needle_kept(cache, answer_occurrences(sample, prompt, tokenizer)) if cell.budget is not None else None
        rows.append(dict(asdict(cell), index=i, depth=sample.depth, prompt_tokens=int(ids.shape[1]),
                         answers=sample.answers, prediction=gen.text,
                         score=score(gen.text, sample.answers, TASK_METRIC[cell.task]),
                         kv_bytes=gen.kv_bytes, budget_kv_bytes=budget_nbytes(cache),
                         seconds=round(t_policy + gen.seconds, 3), needle_heads=kept))
        bar.update(advance=1)
    return cell_record(cell, cfg, rows, t_cell)


def cell_record(cell: Cell, cfg: dict, rows: list[dict], t_cell: float) -> dict:
    """A finished cell: its settings, metrics (mean score, bytes, seconds, the needle diagnostic) and predictions."""
    allocation = cell_allocation(cfg)
    if allocation is not None:
        for r in rows:
            r["head_budgets"] = allocation.name
    n = len(rows)
    metrics = dict(asdict(cell), model=cfg["model"], n=n, seed=cfg["seed"],
                   score=sum(r["score"] for r in rows) / max(n, 1), metric=TASK_METRIC[cell.task],
                   kv_bytes=max((r["kv_bytes"] for r in rows), default=0),
                   budget_kv_bytes=max((r.get("budget_kv_bytes", r["kv_bytes"]) for r in rows), default=0),
                   seconds=round(time.perf_counter() - t_cell, 2),
                   mean_prompt_tokens=sum(r["prompt_tokens"] for r in rows) / max(n, 1))
    heads = [r["needle_heads"] for r in rows if r["needle_heads"] is not None]
    if heads:   # the "needle kept" diagnostic: (layer, KV head) caches holding the whole answer at the end
        metrics["needle_heads"] = sum(heads) / len(heads)
    if allocation is not None:
        metrics["head_budgets"] = allocation.name
    return dict(settings=cfg, metrics=metrics, predictions=rows)


def _cell_settings(cell: Cell, settings: dict, gate_id: str | None) -> dict:
    cfg = dict(settings, **asdict(cell))
    if cell.budget is None:                 # the full cache ignores the eviction settings
        cfg.update(sink=None, window=None)
    if cell.budget is None:
        cfg.pop("head_budgets", None)       # per-head budgets apply to bounded caches only
    gated = uses_gates(cell.policy)
    cfg["gates"] = gate_id if gated else None
    if not gated:
        cfg.pop("lookahead", None)          # an option of the gated policies only
    return cfg


def _check_names(tasks, policies) -> None:
    bad_t = [t for t in tasks if t not in TASKS]
    if bad_t:
        raise ValueError(f"unknown task(s) {bad_t}; valid tasks: {', '.join(TASKS)}")
    bad_p = [p for p in policies if p not in policy_names()]
    if bad_p:
        raise ValueError(f"unknown policy(ies) {bad_p}; valid policies: {', '.join(policy_names())}")


def gate_fingerprint(handle) -> str:
    """What identifies the gates a cell measured: their weights' fingerprint, and the LoRA adapters' when the
    checkpoint brought some."""
    if handle.adapters is None:
        return handle.gates.fingerprint()
    h = hashlib.sha1(handle.gates.fingerprint().encode())
    for name, t in sorted(adapter_state_dict(handle.adapters).items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def _digest(cfg: dict) -> str:
    return hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


# ----------------------------------------------------------------------------------------- outputs


CELL_FIELDS = ("task", "length", "budget", "policy", "head_budgets")


def _cell_key(row: dict) -> tuple:
    """What tells a folder's records (and predictions) apart: the cell, and the gates or rankers it measured."""
    return tuple(row.get(k) for k in CELL_FIELDS + ("gates", "kvp"))


def _stamp_old(predictions: list[dict], records: list[dict]) -> None:
    """Predictions written before they named their gates take them from their cell's record (one per cell then)."""
    names = {tuple(r.get(k) for k in CELL_FIELDS): r for r in records}
    for row in predictions:
        if "gates" not in row:
            record = names.get(tuple(row.get(k) for k in CELL_FIELDS), {})
            row["gates"] = record.get("gates")
            if record.get("kvp"):
                row["kvp"] = record["kvp"]


def _write_outputs(out: Path, records: list[dict], predictions: list[dict]) -> None:
    """Write this run's records and predictions, keeping those of other cells already in the folder."""
    out.mkdir(parents=True, exist_ok=True)
    new = {_cell_key(r) for r in records}
    old_records, old_predictions = [], []
    if (out / "metrics.json").is_file():
        try:
            old_records = json.loads((out / "metrics.json").read_text())
            with open(out / "predictions.jsonl") as f:
                old_predictions = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError) as err:
            raise DataError(f"{out}: cannot read the earlier results to add to them ({err}); move metrics.json "
                            "and predictions.jsonl away (the finished cells under cells/ are reused)") from err
    _stamp_old(old_predictions, old_records)
    records = [r for r in old_records if _cell_key(r) not in new] + records
    predictions = [r for r in old_predictions if _cell_key(r) not in new] + predictions
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(records, indent=1))
    with open(out / "predictions.jsonl.tmp", "w") as f:
        for row in predictions:
            f.write(json.dumps(row) + "\n")
    os.replace(out / "predictions.jsonl.tmp", out / "predictions.jsonl")
    os.replace(tmp, out / "metrics.json")
    (out / "results.md").write_text(markdown_table(records))


def series_name(record: dict, *, gates: bool = False) -> str:
    """The row or line a record belongs to: its policy, and the head-budget allocation it ran with (LU-KV) if any;
    with ``gates``, also the fingerprint of the gates it served (records of two gate sets in one table or figure)."""
    name = record["policy"] + (f" ({record['head_budgets']})" if record.get("head_budgets") else "")
    return name + (f" [gates {record['gates'][:6]}]" if gates and record.get("gates") else "")


def mixes_gates(records: list[dict]) -> bool:
    """Whether ``records`` measured more than one set of gates (then :func:`series_name` tells them apart)."""
    return len({r["gates"] for r in records if r.get("gates")}) > 1


def markdown_table(records: list[dict]) -> str:
    """Rows (task, length, policy), columns budgets; the full cache fills every column with its one score (its own
    column "full" when no record has a budget)."""
    budgets = sorted({r["budget"] for r in records if r["budget"] is not None})
    columns = [f"M={b}" for b in budgets] or ["full"]
    head = "| task | length | policy | " + " | ".join(columns) + " |"
    lines = [head, "|" + "---|" * (3 + len(columns))]
    groups: dict[tuple, dict] = {}
    tag = mixes_gates(records)
    for r in records:
        groups.setdefault((r["task"], r["length"], series_name(r, gates=tag)), {})[r["budget"]] = r["score"]
    for (task, length, policy), by_budget in groups.items():
        if policy == FULL:
            vals = [by_budget[None]] * len(columns)
        else:
            vals = [by_budget.get(b) for b in budgets]
        cells = " | ".join("" if v is None else f"{100 * v:.1f}" for v in vals)
        lines.append(f"| {task} | {length} | {policy} | {cells} |")
    return "\n".join(lines) + "\n\nScores in % (RULER string match); `full` = no eviction (same value for any M).\n"
