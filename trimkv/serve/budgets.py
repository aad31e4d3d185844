"""Per-head budgets: the allocation math of LU-KV and the allocation file that carries it.

LU-KV (Tang et al., 2026, arXiv 2602.08585, "Predicting Future Utility: Global Combinatorial Optimization for
Task-Agnostic KV Cache Eviction") splits one KV budget over the (layer, KV head) pairs by marginal utility:

* each head ``h`` has an **eviction-loss curve** ``L_h(b)``: the oracle importance of the tokens its policy evicts
  when the head keeps ``b`` tokens (measured offline, :mod:`trimkv.eval.profile`);
* the curve is made convex (the **convex-hull relaxation**): its marginal decrements ``d_h(b) = L_h(b-1) - L_h(b)``
  are replaced by their isotonic (non-increasing) regression, computed by the pool-adjacent-violators algorithm
  (:func:`pava_nonincreasing`);
* a **greedy solver** hands the next token to the head with the largest marginal gain ``d_h(b_h + 1)``
  (:func:`greedy_allocate`); on convex curves this is optimal for ``min sum_h L_h(b_h)`` s.t. ``sum_h b_h = B``;
* the per-head ratios of the solutions over a grid of global ratios are averaged into one table of **shares**
  (``b_h / mean budget``, mean 1), which :func:`scale_shares` turns into integer budgets for any mean budget:
  ``b_h ~ budget * share_h``, every head at least ``floor`` (= sink + window + 1: the protected tokens and one to
  evict), the total exactly ``budget * L * Hkv`` (the memory of the uniform cache).

The allocation file (``allocation.json`` in a folder with a README card; :class:`HeadAllocation`) stores, per
profiled policy, the shares [L, Hkv] and the solutions' ratios [R, L, Hkv] over the grid, with the base model, its
shape, the profile's settings and cost. ``make_cache(model, policy, budget, head_budgets=...)`` takes such a file
(the table of that policy, scaled to ``budget``), a :class:`HeadAllocation`, ``"uniform"`` / None, or integer
budgets [L, Hkv] as they are.

**Granularity.** A per-head allocation stores every (layer, KV head)'s budget in a slot buffer as wide as the
layer's largest head budget (the disabled slots of the smaller heads are padding: see
:mod:`trimkv.serve.cache`), so its *allocated* bytes exceed the uniform cache's. A **per-layer** allocation
(``granularity="layer"``, ``trimkv profile --per layer``) gives all KV heads of a layer the same budget: the greedy
solver hands tokens to whole layers (one token to each of its heads, the layer's gain being the sum of its heads'
convexified gains), and the allocated bytes equal the uniform cache's exactly.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AllocationError, CacheError
from ..names import LUKV_GRANULARITIES as GRANULARITIES

FORMAT = "trimkv-head-allocation"
VERSION = 1
FILE = "allocation.json"
UNIFORM = "uniform"


# ------------------------------------------------------------------------------------------- the math


def pava_nonincreasing(values: list[float], weights: list[float] | None = None) -> list[float]:
    """The weighted least-squares non-increasing fit of ``values`` (pool adjacent violators): adjacent blocks that
    violate the order are merged into their weighted mean until the sequence never increases."""
    weights = [1.0] * len(values) if weights is None else list(weights)
    blocks: list[list[float]] = []                    # [mean, weight, count]
    for v, w in zip(values, weights):
        blocks.append([float(v), float(w), 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:     # an increase: pool the two blocks
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks[-1]
            blocks[-1] = [(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2]
    return [m for m, _, n in blocks for _ in range(n)]


def convex_gains(loss: list[float]) -> list[float]:
    """Marginal gains of a loss curve ``L(0..n)`` after the convex-hull relaxation: ``d(b) = L(b-1) - L(b)`` for
    b = 1..n, made non-increasing by :func:`pava_nonincreasing` (their running sum stays L(0) - L(n))."""
    return pava_nonincreasing([loss[b - 1] - loss[b] for b in range(1, len(loss))])


def greedy_allocate(gains: torch.Tensor, total: int, floor: int = 0) -> torch.Tensor:
    """Integer budgets [N] for N heads, summing to ``total``: every head starts at ``floor``, then each next token
    goes to the head with the largest next marginal gain (ties: the lower head index). ``gains`` [N, n]:
    ``gains[h, j]`` is what head h gains from its (floor + j + 1)-th token, non-increasing in j (convexified); a head
    holds at most ``floor + n`` tokens.

    With non-increasing gains the greedy order is the order of all gains sorted (descending gain, then head, then
    position), so the solution is the count per head among the first ``total - N * floor`` of them."""
    return allocations_over_grid(gains, [total], floor)[0]


def _sorted_desc(flat: torch.Tensor) -> torch.Tensor:
    """Indices of ``flat`` by descending value, ties by ascending index (a stable sort)."""
    return torch.sort(-flat.double(), stable=True).indices


def allocations_over_grid(gains: torch.Tensor, totals: list[int], floor: int) -> torch.Tensor:
    """:func:`greedy_allocate` for several totals at once (one sort): [len(totals), N] budgets."""
    N, n = gains.shape
    order = _sorted_desc(gains.reshape(-1))
    head = torch.arange(N).repeat_interleave(n)[order]
    out = []
    for total in totals:
        extra = total - N * floor
        if extra < 0 or extra > N * n:
            raise CacheError(f"cannot hand out {total} tokens to {N} heads of floor {floor} and at most {floor + n}")
        out.append(floor + torch.bincount(head[:extra], minlength=N))
    return torch.stack(out)


def scale_shares(shares: torch.Tensor, budget: int, floor: int) -> torch.Tensor:
    """Integer budgets [L, Hkv] from ``shares`` [L, Hkv] (>= 0, mean 1): about ``budget * share`` each, at least
    ``floor`` each, summing to exactly ``budget * L * Hkv``.

    Heads whose share would fall below the floor get the floor and the others are rescaled to the rest of the total
    (repeated until none falls below); the fractional parts are then rounded by largest remainder (ties: the
    lower flat index)."""
    shares = shares.double().clamp_min(0)
    n, total = shares.numel(), budget * shares.numel()
    if budget < floor:
        raise CacheError(f"budget {budget} is below the per-head floor {floor} (sink + window + 1): raise the budget")
    flat = shares.reshape(-1)
    fixed = torch.zeros(n, dtype=torch.bool)
    while True:
        free = ~fixed
        weight = flat * free
        rest = total - floor * int(fixed.sum())
        x = torch.where(fixed, torch.full_like(flat, float(floor)),
                        weight / weight.sum() * rest if weight.sum() > 0 else
                        free.double() * rest / max(int(free.sum()), 1))
        low = free & (x < floor)
        if not low.any():
            break
        fixed |= low
    base = torch.floor(x).long()
    left = total - int(base.sum())
    if left:
        frac = (x - base.double()).clamp_min(0)
        base[_sorted_desc(frac)[:left]] += 1
    return base.reshape(shares.shape)


# ------------------------------------------------------------------------------------------- the file


@dataclass
class HeadAllocation:
    """A profiled allocation: per policy, the shares [L, Hkv] (mean 1) and the ratios [R, L, Hkv] of the greedy
    solutions at the global keep ratios ``grid`` [R], for ``base_model`` of shape (layers, KV heads)."""

    base_model: str
    shape: tuple[int, int]
    grid: list[float]
    tables: dict[str, dict[str, list]]       # policy -> {"shares": [L][H], "ratios": [R][L][H]}
    settings: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)
    name: str = "allocation"
    granularity: str = "head"                # "layer": one budget for all KV heads of a layer (no padding)

    @property
    def policies(self) -> list[str]:
        return list(self.tables)

    def shares(self, policy: str) -> torch.Tensor:
        """[L, Hkv] float64 shares of ``policy`` (AllocationError if it was not profiled)."""
        if policy not in self.tables:
            raise AllocationError(f"allocation {self.name!r} was profiled for {', '.join(self.tables)}, not for policy "
                                  f"{policy!r}: run `trimkv profile --policies {policy}` or use uniform budgets")
        return torch.tensor(self.tables[policy]["shares"], dtype=torch.float64)

    def budgets(self, policy: str, budget: int, floor: int) -> torch.Tensor:
        """Integer budgets [L, Hkv] of ``policy`` at mean ``budget`` (:func:`scale_shares`; per layer for a
        per-layer allocation, so every head of a layer gets the same budget and the total stays exact)."""
        shares = self.shares(policy)
        if self.granularity == "layer":
            return scale_shares(shares.mean(1, keepdim=True), budget, floor).expand(shares.shape).contiguous()
        return scale_shares(shares, budget, floor)

    def allocated_slots(self, policy: str, budget: int, floor: int) -> int:
        """Slots the cache allocates for ``policy``'s budgets at mean ``budget``: each layer holds its largest head
        budget for every KV head (the budgeted tokens are always ``budget x L x Hkv``)."""
        b = self.budgets(policy, budget, floor)
        return int(b.max(1).values.sum()) * b.shape[1]

    def matched_budget(self, policy: str, budget: int, floor: int) -> int:
        """The largest mean budget whose *allocated* slots fit those of the uniform cache at ``budget`` (equal
        allocated memory rather than equal budgeted tokens; ``budget`` itself for a per-layer allocation);
        CacheError when ``budget`` is below the floor (every head at the floor always fits)."""
        L, H = self.shape
        for m in range(budget, floor - 1, -1):              # from the top: the first that fits is the largest
            if self.allocated_slots(policy, m, floor) <= budget * L * H:
                return m
        raise CacheError(f"budget {budget} is below the per-head floor {floor} (sink + window + 1): raise the budget")

    def to_json(self) -> dict:
        out = {"format": FORMAT, "version": VERSION, "name": self.name, "base_model": self.base_model,
               "shape": list(self.shape), "grid": self.grid, "settings": self.settings, "cost": self.cost}
        if self.granularity != "head":        # absent = per head (files written before the field existed)
            out["granularity"] = self.granularity
        out["tables"] = self.tables
        return out

    def save(self, folder: str | Path, card: str | None = None) -> Path:
        """Write ``folder/allocation.json`` (and ``README.md`` when ``card`` is given); returns the JSON path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / FILE
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        if card is not None:
            (folder / "README.md").write_text(card)
        return path

    def check_model(self, num_layers: int, num_kv_heads: int, model_name: str = "") -> None:
        """AllocationError when the allocation was made for a model of another shape."""
        if tuple(self.shape) != (num_layers, num_kv_heads):
            raise AllocationError(f"allocation {self.name!r} is for {self.base_model} ({self.shape[0]} layers x "
                                  f"{self.shape[1]} KV heads); this model{f' ({model_name})' if model_name else ''} "
                                  f"has {num_layers} x {num_kv_heads}: profile it with `trimkv profile`")


def allocation_path(path: str | Path) -> Path:
    """The JSON file of an allocation given as the file or its folder."""
    path = Path(path)
    return path / FILE if path.is_dir() else path


def load_allocation(path: str | Path) -> HeadAllocation:
    """Read and validate an allocation file (or its folder): AllocationError naming the file and the problem."""
    file = allocation_path(path)
    if not file.is_file():
        raise AllocationError(f"head-budget allocation {path}: no such file (give the folder `trimkv profile` wrote, "
                              f"its {FILE}, or 'uniform')")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AllocationError(f"{file}: not a JSON allocation file ({err}); rerun `trimkv profile`") from None
    return from_json(data, str(file))


def from_json(data, where: str = "allocation") -> HeadAllocation:
    """An allocation from its JSON object, validated (format, shape, finite non-negative shares of mean 1, ratios
    in [0, 1] over a grid of ratios in (0, 1])."""
    def bad(msg: str):
        return AllocationError(f"{where}: {msg}")

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise bad(f"not a trimkv head allocation (expected \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise bad(f"version {data.get('version')!r}; this trimkv reads version {VERSION}")
    shape = data.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise bad(f"shape must be [layers, KV heads] (positive ints), got {shape!r}")
    grid = data.get("grid")
    if not (isinstance(grid, list) and grid and all(isinstance(g, (int, float)) and 0 < g <= 1 for g in grid)):
        raise bad(f"grid must be a non-empty list of global keep ratios in (0, 1], got {grid!r:.80}")
    granularity = data.get("granularity", "head")
    if granularity not in GRANULARITIES:
        raise bad(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    tables = data.get("tables")
    if not isinstance(tables, dict) or not tables:
        raise bad("no tables: the file holds no profiled policy")
    L, H = shape
    for policy, table in tables.items():
        shares = _tensor(table.get("shares") if isinstance(table, dict) else None, (L, H), f"{policy}.shares", bad)
        if not torch.isfinite(shares).all() or (shares < 0).any():
            raise bad(f"{policy}.shares must be finite and non-negative")
        if not math.isclose(float(shares.sum()), L * H, rel_tol=1e-4):
            raise bad(f"{policy}.shares sum to {float(shares.sum()):.6g}, not layers x KV heads = {L * H} (shares "
                      "have mean 1: an allocation keeps the uniform total)")
        if granularity == "layer" and not torch.allclose(shares, shares.mean(1, keepdim=True), atol=1e-5):
            raise bad(f"{policy}.shares differ between the KV heads of a layer in a per-layer allocation")
        ratios = _tensor(table.get("ratios"), (len(grid), L, H), f"{policy}.ratios", bad)
        if not torch.isfinite(ratios).all() or (ratios < 0).any() or (ratios > 1).any():
            raise bad(f"{policy}.ratios must lie in [0, 1]")
    name = data.get("name") if isinstance(data.get("name"), str) else Path(where).parent.name or "allocation"
    return HeadAllocation(base_model=str(data.get("base_model", "")), shape=(L, H), grid=[float(g) for g in grid],
                          tables=tables, settings=dict(data.get("settings") or {}), cost=dict(data.get("cost") or {}),
                          name=name, granularity=granularity)


def _tensor(value, shape: tuple[int, ...], what: str, bad) -> torch.Tensor:
    try:
        t = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise bad(f"{what} must be a numeric array of shape {list(shape)}") from None
    if tuple(t.shape) != shape:
        raise bad(f"{what} has shape {list(t.shape)}, expected {list(shape)}")
    return t


def resolve_head_budgets(head_budgets, *, num_layers: int, num_kv_heads: int, budget: int, floor: int,
                         policy: str) -> list[list[int]] | None:
    """What ``make_cache(head_budgets=...)`` was given, as integer budgets [L][Hkv] (None = uniform): ``"uniform"`` /
    None, an allocation file or folder, a :class:`HeadAllocation` (its table for ``policy`` scaled to ``budget``),
    or integer budgets [L, Hkv] (a tensor or nested lists) used as they are."""
    if head_budgets is None or (isinstance(head_budgets, str) and head_budgets == UNIFORM):
        return None
    if isinstance(head_budgets, (str, Path)):
        head_budgets = load_allocation(head_budgets)
    if isinstance(head_budgets, HeadAllocation):
        head_budgets.check_model(num_layers, num_kv_heads)
        return head_budgets.budgets(policy, budget, floor).tolist()
    rows = head_budgets.tolist() if torch.is_tensor(head_budgets) else head_budgets
    try:
        shape = (len(rows), *{len(r) for r in rows})
    except TypeError:
        raise CacheError(f"head_budgets must be [layers][KV heads] token counts, got {head_budgets!r:.80}") from None
    if shape != (num_layers, num_kv_heads):
        raise CacheError(f"head_budgets has shape {list(shape)}; this model has {num_layers} layers x {num_kv_heads} "
                         "KV heads")
    return rows


__all__ = ["HeadAllocation", "load_allocation", "from_json", "resolve_head_budgets", "scale_shares",
           "greedy_allocate", "allocations_over_grid", "pava_nonincreasing", "convex_gains", "UNIFORM", "FILE",
           "GRANULARITIES"]
