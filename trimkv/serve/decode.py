"""Fast greedy decoding at fixed memory: the bounded cache's decode step under ``torch.compile`` (CUDA graphs on GPU).

A :class:`~trimkv.serve.cache.RetentionCache` holds fixed-shape slot buffers, so a decode step is the same computation on
the same shapes at every step, whatever the context length: eviction is an argmin and an in-place write, the token
count and the latest position (``tokens_seen``, ``t_now``) live in tensors updated in place, and nothing in the step
reads a tensor on the host. One compiled graph therefore serves every step (no recompilation as the context grows);
on a GPU ``mode="reduce-overhead"`` replays it as one CUDA graph per token.

    decoder = CompiledDecoder(model, cache)             # cache = make_cache(model, "trimkv", 512) or any policy
    out = decoder.generate(ids, attention_mask=mask, max_new_tokens=64)   # [B, T + new], like model.generate
    decoder.last                                        # DecodeStats: seconds, tokens/s, recompilations
    out = fast_generate(model, ids, cache, max_new_tokens=64)             # the same in one call

What runs where:

* **prefill** stays eager and chunked (``prefill_chunk`` tokens per forward, as ``generate(prefill_chunk_size=)``),
  with positions from the attention mask like ``generate``, so left-padded rows of different lengths share a batch;
* **each decode step** is one call of the compiled :func:`decode_step`: the model's forward, the greedy token and the
  end-of-sequence bookkeeping, reading and updating a :class:`DecodeState` ([B]-shaped tensors) in place. The host
  copies the new token out and, every ``check_every`` steps, asks whether all rows are done (the loop's only sync).

Outputs are token-identical to eager greedy decoding with the same cache (``model.generate(..., do_sample=False)``
without logits processors, with the same prefill chunk): the tests check it. Refused, with the reason: the global
pool (``GlobalRetentionCache``, whose slot tables have data-dependent shapes). Per-head budgets (``head_budgets``)
keep static shapes (disabled slots), so they compile like the uniform cache. Each (model, batch size, budget,
policy) gets its own graph; torch's
``recompile_limit`` (8 graphs per function) caps how many one process holds at once.
"""
from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass

import torch
from torch._dynamo.utils import counters

from ..attach import install_hooks
from ..compat import cache_name
from ..errors import CacheError
from .cache import RetentionCache
from .factory import gates_for
from .generation import prefill

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class DecodeState:
    """The tensors one step reads and updates in place; fixed shapes and addresses (CUDA graphs replay them)."""

    ids: torch.Tensor    # [B, 1] the token to feed
    pos: torch.Tensor    # [B, 1] its position
    done: torch.Tensor   # [B] bool: the row has produced an end-of-sequence token
    eos: torch.Tensor    # [E] end-of-sequence ids (E = 0: never done)
    pad: torch.Tensor    # [] the token a finished row gets

    @classmethod
    def start(cls, next_logits: torch.Tensor, pos: torch.Tensor, eos: torch.Tensor, pad: torch.Tensor):
        """After a prefill: next_logits [B, V] of the last prompt token, pos [B, 1] of the first new token."""
        first = next_logits.argmax(-1)                                            # [B]
        return cls(ids=first[:, None].clone(), pos=pos.clone(), done=(first[:, None] == eos).any(-1), eos=eos,
                   pad=pad)

    def mark_static(self) -> None:
        for t in (self.ids, self.pos, self.done):
            torch._dynamo.mark_static_address(t)

    def fits(self, other: "DecodeState") -> bool:
        return all(getattr(self, f).shape == getattr(other, f).shape for f in ("ids", "pos", "done", "eos"))

    def copy_(self, other: "DecodeState") -> "DecodeState":
        """Take ``other``'s values into these buffers (same shapes): a CUDA graph recorded on them replays."""
        for f in ("ids", "pos", "done", "eos", "pad"):
            getattr(self, f).copy_(getattr(other, f))
        return self


def decode_step(model, cache_arg: str, cache, state: DecodeState, keep_last: bool = True) -> None:
    """One greedy step of ``model`` with ``cache`` (passed as ``cache_arg``), in place on ``state``: no host sync,
    static shapes. This is the function :func:`compiled_step` compiles; any transformers cache works eagerly."""
    kwargs = {"logits_to_keep": 1} if keep_last else {}
    out = model(input_ids=state.ids, position_ids=state.pos, use_cache=True, **{cache_arg: cache}, **kwargs)
    nxt = torch.where(state.done, state.pad, out.logits[:, -1].argmax(-1))       # [B]
    state.done |= (nxt[:, None] == state.eos).any(-1)
    state.ids.copy_(nxt[:, None])
    state.pos.add_(1)


@functools.lru_cache(maxsize=None)
def compiled_step(mode: str | None = None, backend: str = "inductor"):
    """:func:`decode_step` under ``torch.compile(fullgraph=True, dynamic=False)``: one wrapper per (mode, backend),
    so every decoder with the same shapes shares its graph."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return torch.compile(decode_step, fullgraph=True, dynamic=False, mode=mode, backend=backend)


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far (one more after warm-up = a recompilation)."""
    return int(counters["stats"]["unique_graphs"])


@dataclass
class DecodeStats:
    """What the last :meth:`CompiledDecoder.generate` did (times taken after a device sync)."""

    batch: int
    prompt_tokens: int
    new_tokens: int                # per row, as returned
    prefill_seconds: float
    first_step_seconds: float      # includes compiling on a cold decoder
    timed_steps: int               # every step after the first two (the second records the CUDA graph)
    decode_seconds: float          # their time
    recompiles: int                # graphs compiled during the timed steps: 0 is the point

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput of the timed steps, all rows together."""
        return self.batch * self.timed_steps / self.decode_seconds if self.timed_steps else 0.0


class CompiledDecoder:
    """Greedy decoding of ``model`` with a :class:`~trimkv.serve.cache.RetentionCache`: eager chunked prefill, then
    one compiled graph per step (see the module docstring).

    ``mode``: a ``torch.compile`` mode; ``"auto"`` = ``"reduce-overhead"`` (CUDA graphs) on CUDA, the default
    inductor compile on CPU. ``backend="eager"`` only captures the graph (no code generation: quick to start).
    """

    def __init__(self, model, cache: RetentionCache, *, mode: str | None = "auto", backend: str = "inductor",
                 prefill_chunk: int = 256, check_every: int = 16):
        check_decodable(model, cache)
        self.model, self.cache = model, cache
        self.device = next(model.parameters()).device
        if mode == "auto":
            mode = "reduce-overhead" if self.device.type == "cuda" and backend == "inductor" else None
        self.compiled = compiled_step(mode, backend)
        self.prefill_chunk, self.check_every = prefill_chunk, check_every
        self.cache_arg = cache_name(model)
        self.keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.last: DecodeStats | None = None
        self._state: DecodeState | None = None

    def step(self, state: DecodeState) -> None:
        """One compiled decode step (the cache's buffers and ``state`` must keep their addresses: see
        :meth:`start`)."""
        torch.compiler.cudagraph_mark_step_begin()       # outputs of earlier replays are never read again
        with gates_for(self.model, self.cache):
            self.compiled(self.model, self.cache_arg, self.cache, state, self.keep_last)

    @torch.no_grad()
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
              eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> DecodeState:
        """Empty the cache (in place), prefill input_ids [B, T] eagerly; returns the state of the first step (in the
        buffers of the previous call when the shapes match, so a recorded CUDA graph is replayed, not re-recorded)."""
        ids = input_ids.to(self.device)
        self.cache.reset()               # same buffers; another batch size is refused by the cache's own check
        logits, pos = prefill(self.model, ids, self.cache, attention_mask=attention_mask, chunk=self.prefill_chunk)
        eos, pad = special_ids(self.model, eos_token_id, pad_token_id, self.device)
        return self.adopt(DecodeState.start(logits, pos[:, -1:] + 1, eos, pad))

    def adopt(self, state: DecodeState) -> DecodeState:
        """The state the compiled steps will run on: ``state``'s values in the buffers of the previous call when the
        shapes match (a recorded CUDA graph is replayed, not re-recorded), else ``state`` itself, with it and the
        cache's buffers marked as fixed addresses."""
        if self._state is not None and self._state.fits(state):
            return self._state.copy_(state)
        mark_static(self.cache)
        state.mark_static()
        self._state = state
        return state

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 32, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None) -> torch.Tensor:
        """input_ids [B, T] (left-padded rows: ``attention_mask`` [B, T], 0 = padding) -> [B, T + new].

        ``eos_token_id`` / ``pad_token_id`` default to the model's generation config (``eos_token_id=[]``: never
        stop early); decoding stops once every row has produced an end-of-sequence token, finished rows get padding,
        as in ``generate``."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        B, T = input_ids.shape
        t0 = _now(self.device)
        state = self.start(input_ids, attention_mask, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        out = torch.full((B, max_new_tokens), int(state.pad), dtype=state.ids.dtype, device=self.device)
        t1 = t_first = t_warm = _now(self.device)
        graphs = graphs_compiled()
        for n in range(max_new_tokens):
            out[:, n] = state.ids[:, 0]                                           # token n
            if n + 1 == max_new_tokens or ((n + 1) % self.check_every == 0 and bool(state.done.all())):
                break
            if n == 2:                                                            # compiled and recorded by now
                graphs, t_warm = graphs_compiled(), _now(self.device)
            self.step(state)
            if n == 0:
                t_first = _now(self.device)
        timed = max(n - 2, 0)
        t2 = _now(self.device)
        out = out[:, :_steps_until_all_done(out[:, : n + 1], state.eos)]
        self.last = DecodeStats(B, T, out.shape[1], t1 - t0, t_first - t1, timed, t2 - t_warm if timed else 0.0,
                                graphs_compiled() - graphs if timed else 0)
        return torch.cat([input_ids.to(self.device), out], dim=1)


def fast_generate(model, input_ids: torch.Tensor, cache: RetentionCache, *, attention_mask=None,
                  max_new_tokens: int = 32, prefill_chunk: int = 256, mode: str | None = "auto",
                  backend: str = "inductor", **special_tokens) -> torch.Tensor:
    """``CompiledDecoder(model, cache, ...).generate(input_ids, ...)`` in one call: [B, T] -> [B, T + new].
    Graphs are shared across decoders, so calls with the same shapes compile once."""
    decoder = CompiledDecoder(model, cache, mode=mode, backend=backend, prefill_chunk=prefill_chunk)
    return decoder.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                            **special_tokens)


def check_decodable(model, cache) -> None:
    """Refuse, with the reason, what the compiled step cannot run; install trimkv's hooks if the model has none."""
    if not isinstance(cache, RetentionCache):
        raise CacheError(f"the compiled decoder needs a trimkv RetentionCache (fixed slots per head), got "
                        f"{type(cache).__name__}; a global pool's slot tables have data-dependent shapes: decode "
                        "it eagerly with model.generate")
    install_hooks(model)


def mark_static(cache: RetentionCache) -> None:
    """Tell dynamo the cache's buffers keep their addresses (CUDA graphs then neither copy nor re-record them)."""
    for layer in cache.layers:
        for t in (layer.keys, layer.values, layer.pos, layer.state, layer.t_now, layer.tokens_seen):
            torch._dynamo.mark_static_address(t)


def special_ids(model, eos_token_id=None, pad_token_id=None, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(eos ids [E], pad id []) from the arguments or the model's generation config."""
    gen = getattr(model, "generation_config", None)
    eos = eos_token_id if eos_token_id is not None else getattr(gen, "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = pad_token_id if pad_token_id is not None else getattr(gen, "pad_token_id", None)
    pad = pad if pad is not None else (eos[0] if eos else 0)
    return (torch.tensor(eos, dtype=torch.long, device=device).reshape(-1),
            torch.tensor(pad, dtype=torch.long, device=device))


def _steps_until_all_done(out: torch.Tensor, eos: torch.Tensor) -> int:
    """How many of out [B, n] ``generate`` keeps: it stops after the step at which every row has ended."""
    ended = (out[..., None] == eos).any(-1).long().cumsum(1) > 0                 # [B, n]: ended at or before
    all_ended = ended.all(0).nonzero()
    return int(all_ended[0]) + 1 if all_ended.numel() else out.shape[1]


def _now(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
