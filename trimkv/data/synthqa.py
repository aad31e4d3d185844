"""``builtin:qa`` / ``builtin:qa-plain``: synthetic long-context QA documents, built offline from the corpus.

What the gates learn is what the loss pays for. Here only the answers are targets, and an answer can only be
predicted from a few tokens far back in the document, so the distillation loss pays for keeping exactly those
tokens in a small cache (the paper's long-context gates are trained the same way, on SynthLong).

One document:

* a haystack of real prose (the corpus's ``train`` split; evaluation haystacks use the ``eval`` split or filler),
  fitted to the training length with the tokenizer;
* ``facts`` made-up facts at random depths, of varied kinds: numbers of 3-9 digits, made-up words, person names,
  alphanumeric codes, dates and short phrases ("Kalo Renvas's badge number is 40718.");
* distractors that look alike: other subjects with the same attribute and values of the same kind, and the same
  subject with other attributes;
* ``questions`` questions at the end, each about one of the facts, with its answer.

Two forms. Chat (``builtin:qa``): a conversation, the document and first question in the first user turn, one user
turn per further question, one assistant reply per answer (the assistant-only mask of :mod:`trimkv.data.tokenize` makes
the replies the targets). Plain text (``builtin:qa-plain``): the document, then each question followed by an answer
lead ("The badge number of Kalo Renvas is") and the value; only the values are targets (``target_spans``).

The wording is our own and shares nothing with :mod:`trimkv.eval.tasks` (no "pass key", "magic number", "VAR",
JSON, UUIDs, "Question:" or "Answer:"); ``tests/test_synthqa.py`` checks this.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

SYLLABLES = ("ka", "lo", "mi", "ren", "tor", "vas", "el", "dun", "pri", "sol", "ba", "qu", "zen", "fa", "ri", "mo",
             "ther", "gal", "nis", "ost", "ura", "pel", "wyn", "cor", "dra", "ix")
FIRST_NAMES = ("Alma", "Bruno", "Cleo", "Dario", "Edith", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Luca",
               "Marta", "Nils", "Olga", "Pavel", "Rosa", "Sven", "Tilda", "Umar", "Vera", "Wim", "Yara", "Zeno")
ADJECTIVES = ("green", "silver", "broken", "wooden", "tiny", "striped", "heavy", "golden", "faded", "round",
              "hollow", "crooked", "velvet", "rusty", "painted", "frozen")
NOUNS = ("umbrella", "compass", "lantern", "teapot", "violin", "kettle", "anchor", "notebook", "bicycle", "mirror",
         "saddle", "clock", "basket", "feather", "helmet", "ladder")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
SUBJECT_FORMS = ("{name}", "{name}", "the {word} project", "the {word} account", "Dr. {last}", "the {word} team")

# attribute -> kind of value. Numbers carry their digit count (3-9) with the attribute: distractors of one attribute
# have values of one shape.
ATTRIBUTES = {
    "room number": "number", "order number": "number", "badge number": "number", "serial number": "number",
    "ticket number": "number", "account number": "number", "phone extension": "number", "invoice number": "number",
    "code word": "word", "nickname": "word", "call sign": "word", "secret word": "word",
    "manager": "name", "contact person": "name", "landlord": "name", "mentor": "name",
    "booking reference": "code", "licence plate": "code", "product code": "code", "locker code": "code",
    "start date": "date", "birthday": "date", "deadline": "date", "founding date": "date",
    "lucky charm": "phrase", "favourite object": "phrase", "hidden item": "phrase", "mascot": "phrase",
}
INTROS = ("Read the notes below carefully; some details will matter later.",
          "The following document mixes ordinary text with a few specific details. Keep the details in mind.",
          "Below is a long record. Afterwards you will be asked about particular facts in it.",
          "Go through this text. A few facts are scattered in it, and you will need them.")
STATEMENTS = ("Note that the {attr} of {subj} is {value}.", "{Subj}'s {attr} is {value}.",
              "For the record, {subj} has the {attr} {value}.", "The {attr} assigned to {subj} is {value}.",
              "It was noted that the {attr} of {subj} is {value}.")
QUESTIONS = ("What is the {attr} of {subj}?", "Which {attr} does {subj} have?",
             "Tell me the {attr} of {subj}.", "Do you remember the {attr} of {subj}?")
ANSWER_LEADS = ("The {attr} of {subj} is", "{Subj}'s {attr} is")


@dataclass
class Fact:
    subject: str
    attribute: str
    value: str

    def statement(self, rng: random.Random) -> str:
        return _fill(rng.choice(STATEMENTS), self)

    def question(self, rng: random.Random) -> str:
        return _fill(rng.choice(QUESTIONS), self)

    def answer_lead(self, rng: random.Random) -> str:
        return _fill(rng.choice(ANSWER_LEADS), self)


def _fill(template: str, fact: Fact) -> str:
    subj = fact.subject
    return template.format(attr=fact.attribute, subj=subj, Subj=subj[:1].upper() + subj[1:], value=fact.value)


def made_up_word(rng: random.Random, syllables: int = 3) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(syllables))


def make_value(kind: str, rng: random.Random, digits: int) -> str:
    """A value of one ``kind``; ``digits`` fixes the length of numbers (3-9)."""
    if kind == "number":
        return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
    if kind == "word":
        return made_up_word(rng, rng.randint(2, 4)).title()
    if kind == "name":
        return f"{rng.choice(FIRST_NAMES)} {made_up_word(rng, 2).title()}"
    if kind == "code":
        letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
        return (f"{rng.choice(letters)}{rng.choice(letters)}-{rng.randint(10, 99)}"
                f"{rng.choice(letters)}{rng.randint(0, 9)}")
    if kind == "date":
        return f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1900, 2039)}"
    if kind == "phrase":
        return f"a {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    raise ValueError(f"unknown value kind {kind!r}")


def make_subject(rng: random.Random) -> str:
    form = rng.choice(SUBJECT_FORMS)
    return form.format(name=f"{made_up_word(rng, 2).title()} {made_up_word(rng, 3).title()}",
                       word=made_up_word(rng, 2).title(), last=made_up_word(rng, 3).title())


def make_facts(rng: random.Random, n: int) -> list[Fact]:
    """``n`` facts in look-alike groups: a few attributes, each given to several subjects (values of one shape),
    and some subjects holding several attributes."""
    attrs = rng.sample(sorted(ATTRIBUTES), k=max(1, min(len(ATTRIBUTES), (n + 1) // 2)))
    digits = {a: rng.randint(3, 9) for a in attrs}
    subjects = [make_subject(rng) for _ in range(max(1, (n + 1) // 2))]
    facts: list[Fact] = []
    seen: set[tuple[str, str]] = set()
    values: set[str] = set()
    while len(facts) < n:
        subj, attr = rng.choice(subjects), rng.choice(attrs)
        if (subj, attr) in seen:
            if len(seen) >= len(subjects) * len(attrs):
                subjects.append(make_subject(rng))
            continue
        value = make_value(ATTRIBUTES[attr], rng, digits[attr])
        if value in values:
            continue
        seen.add((subj, attr))
        values.add(value)
        facts.append(Fact(subj, attr, value))
    return facts


class ParagraphPool:
    """Train-split prose paragraphs with their token counts (tokenised once), drawn in a seeded order."""

    def __init__(self, paragraphs: list[str], tokenizer):
        self.paragraphs = paragraphs
        self.tokens = [len(ids) for ids in tokenizer(paragraphs, add_special_tokens=False)["input_ids"]]
        self.tokenizer = tokenizer

    def take(self, rng: random.Random, budget: int) -> list[str]:
        """Consecutive paragraphs from a random start (skipping any that would overflow) whose token counts add up
        to at most ``budget``."""
        out, used = [], 0
        start = rng.randrange(len(self.paragraphs))
        for i in list(range(start, len(self.paragraphs))) + list(range(start)):
            if budget - used < 16:
                break
            if used + self.tokens[i] + 1 <= budget:
                out.append(self.paragraphs[i])
                used += self.tokens[i] + 1
        if not out:
            raise ValueError(f"no corpus paragraph fits a haystack of {budget} tokens: raise seq_len")
        return out

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def make_document(pool: ParagraphPool, rng: random.Random, *, length: int, chat: bool, n_facts: int,
                  n_questions: int, overhead: int = 0) -> dict:
    """One QA document of at most ``length`` tokens (``overhead``: tokens the chat template adds). Returns
    ``{"messages": [...]}`` (chat) or ``{"text": str, "target_spans": [[start, end], ...]}`` (plain).

    The haystack is first sized from per-paragraph token counts, then the whole rendering is counted and the last
    paragraphs are dropped until it fits (pieces tokenise a little differently once joined)."""
    facts = make_facts(rng, n_facts)
    asked = rng.sample(facts, k=min(n_questions, len(facts)))
    intro = rng.choice(INTROS)
    statements = [f.statement(rng) for f in facts]
    qa = [(f.question(rng), f.answer_lead(rng), f.value) for f in asked]
    tail = "\n\n".join(f"{q}\n{lead} {v}." for q, lead, v in qa)
    fixed = pool.count(intro) + sum(pool.count(s) + 1 for s in statements) + pool.count(tail) + overhead
    if chat:
        fixed += 6 * len(qa)                                            # role headers of the extra turns
    budget = length - fixed - 8
    if budget < 32:
        raise ValueError(f"a QA document of {length} tokens leaves {budget} for its haystack: raise seq_len "
                         f"(>= {fixed + 40} for {n_facts} facts and {n_questions} questions)")
    paragraphs = pool.take(rng, budget)
    depths = sorted(rng.uniform(0.0, 0.9) for _ in statements)
    order = rng.sample(statements, k=len(statements))
    while True:
        doc = _render(paragraphs, depths, order, intro, qa, chat)
        if pool.count(_text_of(doc, pool.tokenizer)) + (0 if chat else 1) <= length or len(paragraphs) == 1:  # +EOS
            return doc
        paragraphs = paragraphs[:-1]


def _text_of(doc: dict, tokenizer) -> str:
    if "messages" in doc:
        return tokenizer.apply_chat_template(doc["messages"], tokenize=False)
    return doc["text"]


def _render(paragraphs: list[str], depths: list[float], statements: list[str], intro: str, qa: list, chat: bool):
    """The document with each statement appended to the paragraph at its depth, then the questions."""
    extra: list[list[str]] = [[] for _ in paragraphs]
    for depth, sentence in zip(depths, statements):
        extra[min(int(depth * len(paragraphs)), len(paragraphs) - 1)].append(sentence)
    body = "\n\n".join(" ".join([p, *e]) for p, e in zip(paragraphs, extra))
    context = f"{intro}\n\n{body}"
    if chat:
        messages = [{"role": "user", "content": f"{context}\n\n{qa[0][0]}"}]
        for i, (q, lead, value) in enumerate(qa):
            if i:
                messages.append({"role": "user", "content": q})
            messages.append({"role": "assistant", "content": f"{lead} {value}."})
        return {"messages": messages}
    text, spans = context, []
    for q, lead, value in qa:
        text += f"\n\n{q}\n{lead} "
        spans.append([len(text), len(text) + len(value) + 1])            # the value and its full stop
        text += f"{value}."
    return {"text": text, "target_spans": spans}


def qa_documents(paragraphs: list[str], tokenizer, *, length: int, n_docs: int, chat: bool, seed: int,
                 n_facts: tuple[int, int] = (2, 6), n_questions: tuple[int, int] = (1, 3)) -> list[dict]:
    """``n_docs`` documents (see :func:`make_document`) with ``n_facts`` / ``n_questions`` drawn per document from the
    given inclusive ranges; deterministic in ``seed``."""
    pool = ParagraphPool(paragraphs, tokenizer)
    overhead = 0
    if chat:
        overhead = pool.count(tokenizer.apply_chat_template([{"role": "user", "content": ""},
                                                             {"role": "assistant", "content": ""}], tokenize=False))
    docs = []
    for i in range(n_docs):
        rng = random.Random(seed * 1_000_003 + i)
        docs.append(make_document(pool, rng, length=length, chat=chat, n_facts=rng.randint(*n_facts),
                                  n_questions=rng.randint(*n_questions), overhead=overhead))
    return docs
