"""RULER-style synthetic long-context tasks, generated offline from a seed (RULER: arXiv 2404.06654).

Every task hides what the question asks about inside a long context and puts the question AFTER it, so a
model can only answer if its KV cache kept the right tokens. A sample is fitted to a target prompt length
in tokens of the given tokenizer, counted on the rendered prompt (chat template included when used).

Tasks and their RULER counterparts (the instruction and question wording is ours, not RULER's):
  * ``passkey``           - the classic pass-key needle (5 digits) in a haystack (RULER ``niah_single_1``
                            uses 7-digit numbers; we keep the pass-key sentence of Mohtashami & Jaggi).
  * ``multikey_needle``   - ``num_needles`` (4) "special magic number" needles with distinct word-like keys;
                            one key is asked (RULER ``niah_multikey_1``; our keys are made-up words).
  * ``multivalue_needle`` - ``num_values`` (4) needles with the same key; all values must be returned
                            (RULER ``niah_multivalue``).
  * ``kv_retrieval``      - a JSON object of ``uuid -> uuid`` pairs; the value of one key is asked (the
                            "Lost in the Middle" task RULER cites). Depth picks the queried pair's place
                            among the pairs. One pair is ~45 tokens, too coarse to hit a short target, so
                            the tokens left over (less than one pair) are haystack text before the JSON.
  * ``variable_tracking`` - a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... of ``num_hops`` (4) hops,
                            plus ``num_chains - 1`` (0) distractor chains; every variable that ends up
                            holding the value must be named (RULER ``vt``; names are 5 capital letters).
  * ``frequent_words``    - made-up words with Zipf counts (``count_r ~ K / r^alpha``, alpha 2 as in
                            RULER ``fwe``); name the 3 most frequent. RULER samples the counts; ours are
                            exact so the top 3 never tie. No haystack, no depth (``Sample.depth`` is None).

Depth (0.0 = start of the haystack, 1.0 = end) places the needle that is asked about; for tasks with
several needles that all must be found (multi-value, variable tracking) the k needles sit at depths
``depth + (1 - depth) * i / k``, i = 0..k-1, so they are spread over the rest of the haystack and keep their
order. Distractor needles sit at seeded random depths. Needles go in at sentence or paragraph breaks, and
depth is measured in characters of the haystack (close to tokens for a homogeneous haystack).

Haystacks: ``"filler"`` repeats "The grass is green. The sky is blue. ..." (RULER's "repeat" noise);
``"prose"`` is real English from ``trimkv.data.corpus`` split ``"eval"`` (RULER uses Paul Graham's essays).
"""
from __future__ import annotations

import inspect
import json
import math
import random
import re
import uuid
from dataclasses import dataclass, field
from typing import Callable

from trimkv.data import corpus
from trimkv.names import TASK_NAMES, check_names

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
HAYSTACKS = ("filler", "prose")


@dataclass
class Sample:
    """One prompt with its reference answers.

    The user turn is ``context`` + ``"\\n\\nQuestion: "`` + ``question``; ``render_prompt`` wraps it in
    the chat template or, for plain text, appends ``"\\nAnswer:"``. ``metadata`` records how it was built:
    ``n_tokens`` (measured prompt length), ``chat`` (whether the length was fitted to the chat rendering),
    ``haystack``, ``seed``, ``needles`` (the needle sentences, for the oracle policy), ``needle_depths`` (where each
    needle landed, as a fraction of the haystack)
    and task-specific fields.
    """

    task: str
    context_length: int  # target prompt length in tokens
    depth: float | None
    context: str
    question: str
    answers: list[str]
    metadata: dict = field(default_factory=dict)
    answer_prefix: str = ""  # RULER's answer prefix ("The pass key is"), generation continues after it

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"{self.context}\n\nQuestion: {self.question}"}]

    @property
    def prompt_text(self) -> str:
        if self.answer_prefix:  # RULER's plain template: the question, then the answer prefix to continue
            return f"{self.context}\n\n{self.question} {self.answer_prefix}"
        return f"{self.context}\n\nQuestion: {self.question}\nAnswer:"


# -- rendering and scoring -------------------------------------------------------------------------------


def render_prompt(sample: Sample, tokenizer, chat: bool | None = None) -> str:
    """The prompt as a string: the chat template with a generation prompt when ``chat`` and the tokenizer
    has a template, else plain text ending in ``"Answer:"``. ``chat=None`` renders the way the sample was
    fitted (``sample.metadata["chat"]``), which is what keeps its length on target."""
    if chat is None:
        chat = sample.metadata.get("chat", True)
    if chat and getattr(tokenizer, "chat_template", None):
        messages = sample.prompt_messages
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + sample.answer_prefix
    return sample.prompt_text


def score(prediction: str, answers: list[str], mode: str) -> float:
    """RULER's string match, case-insensitive: ``"all"`` = fraction of answers found in the prediction,
    ``"part"`` = 1.0 if any answer is found, else 0.0."""
    if not answers:
        raise ValueError("score() needs at least one reference answer")
    found = [a.lower() in prediction.lower() for a in answers]
    if mode == "all":
        return sum(found) / len(found)
    if mode == "part":
        return float(any(found))
    raise ValueError(f"unknown score mode {mode!r}; valid modes: all, part")


# -- the tasks -------------------------------------------------------------------------------------------
# A generator returns a _Plan: the instruction, question and answers, plus either needles to spread in a
# haystack or a ``body(size) -> text`` that grows with an integer size (kv pairs, word counts).


@dataclass
class _Plan:
    instruction: str
    question: str
    answers: list[str]
    needles: list[tuple[float, str]] = field(default_factory=list)  # (depth, sentence)
    body: Callable[[int], str] | None = None
    min_size: int = 1  # the smallest body size that makes a valid sample
    pad: bool = False  # top the body up to the target length with haystack text placed before it
    metadata: dict = field(default_factory=dict)
    answer_prefix: str = ""


def _passkey(rng: random.Random, depth: float) -> _Plan:
    key = str(rng.randint(10_000, 99_999))
    return _Plan(
        instruction="There is an important piece of information hidden inside a lot of irrelevant text. "
        "Find it and memorize it. I will quiz you about it.",
        question="What is the pass key?",
        answers=[key],
        answer_prefix="The pass key is",
        needles=[(depth, f"The pass key is {key}. Remember it. {key} is the pass key.")],
    )


def _multikey_needle(rng: random.Random, depth: float, num_needles: int = 4) -> _Plan:
    keys = _distinct(rng, num_needles, lambda: f"{_word(rng)}-{_word(rng)}")
    values = _distinct(rng, num_needles, lambda: str(rng.randint(1_000_000, 9_999_999)))
    needles = [(depth, _magic(keys[0], values[0]))]
    needles += [(rng.random(), _magic(k, v)) for k, v in zip(keys[1:], values[1:])]
    return _Plan(
        instruction="Some special magic numbers are hidden inside the following text. Memorize them; "
        "I will ask you about one of them.",
        question=f"What is the special magic number for {keys[0]} mentioned in the text above?",
        answers=[values[0]],
        answer_prefix=f"The special magic number for {keys[0]} mentioned in the text is",
        needles=needles,
        metadata={"key": keys[0], "distractor_keys": keys[1:]},
    )


def _multivalue_needle(rng: random.Random, depth: float, num_values: int = 4) -> _Plan:
    key = f"{_word(rng)}-{_word(rng)}"
    values = _distinct(rng, num_values, lambda: str(rng.randint(1_000_000, 9_999_999)))
    return _Plan(
        instruction="Some special magic numbers are hidden inside the following text. Memorize them; "
        "I will ask you about them.",
        question=f"What are all the special magic numbers for {key} mentioned in the text above?",
        answers=values,
        answer_prefix=f"The special magic numbers for {key} mentioned in the text are",
        needles=[(_spread(depth, i, num_values), _magic(key, v)) for i, v in enumerate(values)],
        metadata={"key": key},
    )


def _kv_retrieval(rng: random.Random, depth: float) -> _Plan:
    def new_uuid() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    query, answer = new_uuid(), new_uuid()
    pool: list[tuple[str, str]] = []

    def body(n_pairs: int) -> str:
        while len(pool) < n_pairs:  # grows lazily; the same seed always yields the same pairs
            pool.append((new_uuid(), new_uuid()))
        pairs = pool[: max(n_pairs - 1, 0)]
        pairs.insert(round(depth * len(pairs)), (query, answer))
        return "JSON data:\n" + json.dumps(dict(pairs), indent=1)

    return _Plan(
        instruction="Extract the value corresponding to the specified key in the JSON object below.",
        question=f'What is the value associated with the key "{query}" in the JSON object above?',
        answers=[answer],
        answer_prefix=f'The value associated with the key "{query}" is',
        body=body,
        pad=True,
        metadata={"key": query},
    )


def _variable_tracking(rng: random.Random, depth: float, num_hops: int = 4, num_chains: int = 1) -> _Plan:
    names = _distinct(rng, (num_hops + 1) * num_chains, lambda: "".join(rng.choices(_CAPITALS, k=5)))
    values = _distinct(rng, num_chains, lambda: str(rng.randint(10_000, 99_999)))
    needles = []
    for c in range(num_chains):
        chain = names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)]
        lines = [f"VAR {chain[0]} = {values[c]}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
        depths = [_spread(depth, i, len(lines)) for i in range(len(lines))] if c == 0 else (
            sorted(rng.random() for _ in lines))
        needles += list(zip(depths, lines))
    return _Plan(
        instruction="Memorize and track the chain(s) of variable assignment hidden in the following text.",
        question=f"Find all variables that are assigned the value {values[0]} in the text above.",
        answers=names[: num_hops + 1],
        answer_prefix=f"The variables assigned the value {values[0]} are:",
        needles=needles,
        metadata={"value": values[0]},
    )


def _frequent_words(rng: random.Random, depth: float, alpha: float = 2.0, vocab: int = 1000) -> _Plan:
    if alpha <= 0 or vocab < 4:
        raise ValueError(f"frequent_words needs alpha > 0 and vocab >= 4; got alpha={alpha}, vocab={vocab}")
    words = _distinct(rng, vocab, lambda: _word(rng))
    # The smallest top count from which the counts of ranks 1..4 differ by at least one: the top 3 never tie.
    gap = min(r**-alpha - (r + 1) ** -alpha for r in (1, 2, 3))
    order_seed = rng.random()

    def body(top_count: int) -> str:
        counts = [int(top_count / r**alpha) for r in range(1, vocab + 1)]
        text = [w for w, c in zip(words, counts) for _ in range(c)]
        random.Random(order_seed).shuffle(text)
        return " ".join(text)

    return _Plan(
        instruction="Below is a coded text made of made-up words. Keep track of how often each coded word "
        "appears.",
        question="What are the three most frequently appearing coded words in the text above?",
        answers=words[:3],
        answer_prefix="The three most frequently appearing coded words are:",
        body=body,
        min_size=math.ceil(1 / gap),
    )


TASKS: dict[str, Callable[..., _Plan]] = {
    "passkey": _passkey,
    "multikey_needle": _multikey_needle,
    "multivalue_needle": _multivalue_needle,
    "kv_retrieval": _kv_retrieval,
    "variable_tracking": _variable_tracking,
    "frequent_words": _frequent_words,
}
check_names("trimkv.eval.tasks.TASKS", TASKS, TASK_NAMES)
TASK_METRIC: dict[str, str] = {name: "all" for name in TASKS}  # RULER scores all its synthetic tasks "all"


# -- building samples ------------------------------------------------------------------------------------


def make_samples(
    task: str,
    tokenizer,
    *,
    context_length: int,
    n: int,
    seed: int = 0,
    depths: list[float] | None = None,
    haystack: str = "filler",
    chat: bool = True,
    **options,
) -> list[Sample]:
    """``n`` samples of ``task`` whose rendered prompts are ``context_length`` tokens (a few tokens under).

    Sample i uses depth ``depths[i % len(depths)]``; by default depths are spread evenly over [0, 1].
    ``options`` go to the task (``num_needles``, ``num_values``, ``num_hops``, ``num_chains``, ``alpha``,
    ``vocab``: see the task functions).
    The same arguments always give the same samples; each sample draws from its own seeded generator.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if haystack not in HAYSTACKS:
        raise ValueError(f"unknown haystack {haystack!r}; valid haystacks: {', '.join(HAYSTACKS)}")
    if depths is None:
        depths = [i / (n - 1) for i in range(n)] if n > 1 else [0.5]
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad or not depths:
        raise ValueError(f"depths must be a non-empty list of fractions in [0, 1]; got {list(depths)}")
    known = list(inspect.signature(TASKS[task]).parameters)[2:]  # after (rng, depth)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"task {task!r} has no option(s) {unknown}; its options: {known or 'none'}")
    chat = bool(chat and getattr(tokenizer, "chat_template", None))
    samples = []
    for i in range(n):
        rng = random.Random(f"trimkv.eval:{task}:{seed}:{i}")
        depth = depths[i % len(depths)]
        plan = TASKS[task](rng, depth, **options)
        sample = Sample(task, context_length, depth, "", plan.question, plan.answers, dict(plan.metadata),
                        answer_prefix=plan.answer_prefix)
        sample.metadata.update(chat=chat, haystack=haystack, seed=seed)
        if plan.body is None:
            _fit_haystack(sample, plan, tokenizer, haystack, rng)
        else:
            _fit_body(sample, plan, tokenizer, haystack, rng)
            if not plan.pad:
                sample.metadata["haystack"] = None
                sample.depth = None
        samples.append(sample)
    return samples


def _count(tokenizer, sample: Sample) -> int:
    text = render_prompt(sample, tokenizer)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _largest_fitting(fits: Callable[[int], bool], lo: int, hi: int) -> int:
    """The largest size in [lo, hi] with ``fits(size)``, for a ``fits`` that is true up to a point and
    true at ``lo``."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _too_small(sample: Sample, tokens: int) -> ValueError:
    return ValueError(
        f"context_length={sample.context_length} is too small for task {sample.task!r}: the instruction, "
        f"needle(s) and question alone take {tokens} tokens; ask for more"
    )


def _fit_body(sample: Sample, plan: _Plan, tokenizer, haystack: str, rng: random.Random) -> None:
    """Grow the task's own body (kv pairs, word counts) to the largest size that fits the target; with
    ``plan.pad``, fill what is left (less than one step of the body) with haystack text before it."""

    def fits(size: int) -> bool:
        sample.context = f"{plan.instruction}\n\n{plan.body(size)}"
        return _count(tokenizer, sample) <= sample.context_length

    if not fits(plan.min_size):
        raise _too_small(sample, _count(tokenizer, sample))
    hi = plan.min_size
    while fits(hi * 2):
        hi *= 2
    size = _largest_fitting(fits, hi, hi * 2 - 1)
    body = plan.body(size)
    sample.metadata["size"] = size
    if plan.pad:
        def compose(text: str) -> str:
            return "\n\n".join(part for part in (plan.instruction, text, body) if part)

        _fill(sample, tokenizer, haystack, rng, compose)
    else:
        fits(size)
        sample.metadata["n_tokens"] = _count(tokenizer, sample)


def _fit_haystack(sample: Sample, plan: _Plan, tokenizer, haystack: str, rng: random.Random) -> None:
    """Fill the context with as many haystack words as fit, with the needles inserted at their depths."""

    sample.metadata["needles"] = [text for _, text in plan.needles]   # what the oracle policy keeps

    def compose(text: str) -> str:
        text, sample.metadata["needle_depths"] = _insert_needles(text, plan.needles)
        return f"{plan.instruction}\n\n{text}"

    _fill(sample, tokenizer, haystack, rng, compose)


def _fill(sample: Sample, tokenizer, haystack: str, rng: random.Random, compose: Callable[[str], str]):
    """Set ``sample.context = compose(the first k haystack words)`` for the largest k that fits the target."""
    prose_seed = rng.randrange(2**31)
    pool: list[str] = []

    def grow(n_chars: int) -> None:
        text = corpus.prose_text("eval", n_chars, seed=prose_seed) if haystack == "prose" else (
            FILLER * (n_chars // len(FILLER) + 1))
        pool[:] = re.findall(r"\S+\s*", text)

    def fits(n_words: int) -> bool:
        sample.context = compose("".join(pool[:n_words]).rstrip())
        return _count(tokenizer, sample) <= sample.context_length

    if not fits(0):
        raise _too_small(sample, _count(tokenizer, sample))
    grow(8 * sample.context_length)
    while fits(len(pool)):  # a tokenizer with long tokens needs more text than the first guess
        grow(4 * len("".join(pool)))
    fits(_largest_fitting(fits, 0, len(pool)))
    sample.metadata["n_tokens"] = _count(tokenizer, sample)


def _insert_needles(haystack: str, needles: list[tuple[float, str]]) -> tuple[str, list[float]]:
    """Insert each needle at the sentence or paragraph boundary nearest its depth.

    Returns the text and, per needle in the given order, where it landed as a fraction of the haystack's
    characters."""
    haystack = haystack.rstrip()
    n = len(haystack)
    bounds = [0] + [m.end() for m in re.finditer(r"[.!?]\s+|\n\s*\n", haystack)] + [n]
    at = [min(bounds, key=lambda b: (abs(b - d * n), b)) for d, _ in needles]
    pieces, last = [], 0
    for pos in sorted(set(at)):
        group = " ".join(text for (_, text), a in zip(needles, at) if a == pos)
        pieces.append(haystack[last:pos])
        pieces.append(group + " " if pos < n else (" " + group if n else group))
        last = pos
    pieces.append(haystack[last:])
    return "".join(pieces), [a / n if n else 0.0 for a in at]


# -- helpers ---------------------------------------------------------------------------------------------

_CAPITALS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "st", "tr", "pl")
_VOWELS = ("a", "e", "i", "o", "u")


def _word(rng: random.Random) -> str:
    """A pronounceable made-up word such as ``"tovarin"`` (2-3 syllables, sometimes a final consonant)."""
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))
    return word + rng.choice(("", "", "n", "r", "s", "l"))


def _distinct(rng: random.Random, k: int, draw: Callable[[], str]) -> list[str]:
    out: dict[str, None] = {}
    while len(out) < k:
        out[draw()] = None
    return list(out)


def _spread(depth: float, i: int, k: int) -> float:
    return depth + (1.0 - depth) * i / k


def _magic(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."
