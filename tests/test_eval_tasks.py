"""RULER-style tasks: length on target, needles where depth says, answers recoverable, seeded, scored."""
import collections
import json
import re

import pytest
from transformers import PreTrainedTokenizerFast

from trimkv.eval import TASK_METRIC, TASKS, make_samples, render_prompt, score

def n_tokens(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


def haystack_of(sample):
    """The context after the instruction paragraph."""
    return sample.context.split("\n\n", 1)[1]


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("haystack", ["filler", "prose"])
def test_length_on_target_and_answers_in_context(tokenizer, task, haystack):
    for sample in make_samples(task, tokenizer, context_length=480, n=2, seed=3, haystack=haystack):
        prompt = render_prompt(sample, tokenizer)
        length = n_tokens(tokenizer, prompt)
        assert 0.95 * 480 <= length <= 480
        assert sample.metadata["n_tokens"] == length
        assert sample.answer_prefix  # RULER-style: generation continues after an answer prefix
        assert prompt.startswith("<|user|>") and prompt.endswith("<|assistant|>\n" + sample.answer_prefix)
        question_at = prompt.index("Question:")
        for answer in sample.answers:  # the answer comes before the question: the cache must keep it
            assert 0 <= prompt.find(answer) < question_at


@pytest.mark.parametrize("task", sorted(TASKS))
def test_seeded(tokenizer, task):
    a = make_samples(task, tokenizer, context_length=500, n=2, seed=0)
    b = make_samples(task, tokenizer, context_length=500, n=2, seed=0)
    c = make_samples(task, tokenizer, context_length=500, n=2, seed=1)
    assert a == b
    assert [s.answers for s in a] != [s.answers for s in c]
    assert a[0].answers != a[1].answers  # samples of one call differ too


def test_prose_haystack_differs_between_samples(tokenizer):
    a, b = make_samples("passkey", tokenizer, context_length=300, n=2, depths=[0.5], haystack="prose")
    assert haystack_of(a)[:100] != haystack_of(b)[:100]
    assert "The grass is green" not in a.context


@pytest.mark.parametrize("haystack", ["filler", "prose"])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_needle_sits_at_its_depth(tokenizer, haystack, depth):
    # 2000 tokens of this tokenizer hold ~15 prose sentences: the needle lands within one of its depth
    (sample,) = make_samples(
        "passkey", tokenizer, context_length=2000, n=1, depths=[depth], haystack=haystack
    )
    text = haystack_of(sample)
    at = text.index(f"The pass key is {sample.answers[0]}.")
    if depth == 0.0:
        assert at == 0
    elif depth == 1.0:
        assert text.endswith(f"{sample.answers[0]} is the pass key.")
    else:
        assert abs(at / len(text) - depth) < 0.1
    assert sample.metadata["needle_depths"][0] == pytest.approx(depth, abs=0.1)


def test_default_depths_spread_evenly(tokenizer):
    samples = make_samples("passkey", tokenizer, context_length=300, n=3)
    assert [s.depth for s in samples] == [0.0, 0.5, 1.0]
    samples = make_samples("passkey", tokenizer, context_length=300, n=3, depths=[0.2, 0.8])
    assert [s.depth for s in samples] == [0.2, 0.8, 0.2]


def test_multikey_asks_one_key_among_distractors(tokenizer):
    (sample,) = make_samples("multikey_needle", tokenizer, context_length=600, n=1, num_needles=5)
    key = sample.metadata["key"]
    assert key in sample.question and len(sample.answers) == 1
    found = re.findall(r"special magic numbers for ([\w-]+) is: (\d+)\.", sample.context)
    assert len(found) == 5 and len({k for k, _ in found}) == 5
    assert dict(found)[key] == sample.answers[0]
    assert set(sample.metadata["distractor_keys"]) == {k for k, _ in found} - {key}


def test_multivalue_returns_every_value_in_order(tokenizer):
    (sample,) = make_samples("multivalue_needle", tokenizer, context_length=600, n=1, depths=[0.3])
    found = re.findall(r"special magic numbers for ([\w-]+) is: (\d+)\.", sample.context)
    assert [v for _, v in found] == sample.answers and len(sample.answers) == 4
    assert {k for k, _ in found} == {sample.metadata["key"]}
    assert sample.metadata["needle_depths"][0] == pytest.approx(0.3, abs=0.1)


def test_kv_retrieval_json_holds_the_pair_at_its_depth(tokenizer):
    for depth in (0.0, 1.0):
        (sample,) = make_samples("kv_retrieval", tokenizer, context_length=800, n=1, depths=[depth])
        blob = sample.context[sample.context.index("{") :]
        pairs = json.loads(blob)
        keys = list(pairs)
        assert len(keys) >= 3
        assert pairs[sample.metadata["key"]] == sample.answers[0]
        assert keys.index(sample.metadata["key"]) == (0 if depth == 0.0 else len(keys) - 1)
        assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", sample.answers[0])


def test_variable_tracking_chain(tokenizer):
    (sample,) = make_samples("variable_tracking", tokenizer, context_length=800, n=1, num_chains=2)
    names, value = sample.answers, sample.metadata["value"]
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    assert value in sample.question
    positions = [sample.context.index(f"VAR {names[0]} = {value}.")]
    positions += [sample.context.index(f"VAR {b} = VAR {a}.") for a, b in zip(names, names[1:])]
    assert positions == sorted(positions)
    assert len(re.findall(r"VAR [A-Z]{5} = ", sample.context)) == 10  # plus one distractor chain


def test_frequent_words_top_three(tokenizer):
    for seed in range(3):
        (sample,) = make_samples("frequent_words", tokenizer, context_length=500, n=1, seed=seed)
        counts = collections.Counter(sample.context.split("\n\n", 1)[1].split()).most_common()
        assert [w for w, _ in counts[:3]] == sample.answers
        assert counts[2][1] > counts[3][1]
        assert sample.depth is None


def test_render_plain_and_without_template(tokenizer):
    (sample,) = make_samples("passkey", tokenizer, context_length=300, n=1, chat=False)
    plain = render_prompt(sample, tokenizer)
    assert plain.endswith("\n\nWhat is the pass key? The pass key is") and "<|user|>" not in plain
    assert 0.95 * 300 <= n_tokens(tokenizer, plain) <= 300
    assert render_prompt(sample, tokenizer, chat=True).startswith("<|user|>")
    no_template = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    (sample,) = make_samples("passkey", no_template, context_length=300, n=1, chat=True)
    assert sample.metadata["chat"] is False
    assert render_prompt(sample, no_template, chat=True).endswith("What is the pass key? The pass key is")


def test_errors_name_the_problem(tokenizer):
    with pytest.raises(ValueError, match="valid tasks: passkey"):
        make_samples("niah", tokenizer, context_length=300, n=1)
    with pytest.raises(ValueError, match="valid haystacks: filler, prose"):
        make_samples("passkey", tokenizer, context_length=300, n=1, haystack="essays")
    with pytest.raises(ValueError, match=r"no option\(s\) \['num_needles'\]; its options: none"):
        make_samples("passkey", tokenizer, context_length=300, n=1, num_needles=3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        make_samples("passkey", tokenizer, context_length=300, n=1, depths=[1.5])
    for task in TASKS:
        with pytest.raises(ValueError, match="too small"):
            make_samples(task, tokenizer, context_length=20, n=1)


def test_score_all_and_part():
    assert score("The pass key is 71432.", ["71432"], "all") == 1.0
    assert score("no idea", ["71432"], "all") == 0.0
    assert score("kure, VEKOS", ["plotor", "kure", "vekos"], "all") == pytest.approx(2 / 3)
    assert score("kure", ["plotor", "kure"], "part") == 1.0
    assert score("nothing", ["plotor", "kure"], "part") == 0.0
    with pytest.raises(ValueError, match="all, part"):
        score("x", ["x"], "exact")
    with pytest.raises(ValueError, match="at least one"):
        score("x", [], "all")


def test_every_task_has_a_metric():
    assert set(TASK_METRIC) == set(TASKS) and set(TASK_METRIC.values()) <= {"all", "part"}
