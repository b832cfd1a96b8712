"""The generated tasks must be reproducible, split cleanly, and carry references that are actually right."""

from __future__ import annotations

import re

import pytest

from data_blends import generators
from data_blends.generators import FACTS, SOURCES_GENERATED, _satisfies, generate
from data_blends.task import TaskRow

N_TRAIN, N_TEST = 400, 150


@pytest.fixture(scope="module")
def rows() -> dict[tuple[str, str], list[TaskRow]]:
    return {(s, split): generate(s, split, n) for s in SOURCES_GENERATED for split, n in
            (("train", N_TRAIN), ("test", N_TEST))}


def test_same_arguments_give_same_rows_and_seed_changes_them():
    for source in SOURCES_GENERATED:
        first = generate(source, "train", 50, seed=3)
        assert first == generate(source, "train", 50, seed=3)
        assert [r["prompt"] for r in first] != [r["prompt"] for r in generate(source, "train", 50, seed=4)]


def test_rows_have_ids_counts_and_empty_system(rows):
    for (source, split), batch in rows.items():
        assert len(batch) == (N_TRAIN if split == "train" else N_TEST)
        assert [r["id"] for r in batch] == [f"{source}-{split}-{i:06d}" for i in range(len(batch))]
        assert all(r["source"] == source and r["system"] == "" and r["context"] == [] for r in batch)
        assert len({r["prompt"] for r in batch}) == len(batch)


def test_train_and_test_prompts_are_disjoint(rows):
    for source in SOURCES_GENERATED:
        train = {r["prompt"] for r in rows[source, "train"]}
        test = {r["prompt"] for r in rows[source, "test"]}
        assert train and test and not train & test
        assert all(generators.split_of(p) == "test" for p in test)


def test_blend_sized_requests_are_served():
    """The tiny blends ask for thousands of rows per source; every family must have that many distinct prompts."""
    for source in SOURCES_GENERATED:
        assert len({r["prompt"] for r in generate(source, "train", 4000, seed=1)}) == 4000
        assert len(generate(source, "test", 300, seed=1)) == 300


def test_an_exhausted_family_fails_instead_of_looping(monkeypatch):
    monkeypatch.setitem(generators._FAMILIES, "math", lambda rng: {"prompt": "What is 1 + 1?"})
    with pytest.raises(RuntimeError, match="distinct"):
        generate("math", generators.split_of("What is 1 + 1?"), 2)


def test_unknown_source_or_split_is_rejected():
    with pytest.raises(ValueError, match="chat"):
        generate("chat", "train", 1)
    with pytest.raises(ValueError, match="dev"):
        generate("math", "dev", 1)


# ---------------------------------------------------------------- math

_MATH_TEMPLATES = (
    (r"What is (\d+) \+ (\d+)\?", lambda a, b: a + b),
    (r"\w+ has (\d+) \w+ and buys (\d+) more\. How many \w+ does \w+ have now\?", lambda a, b: a + b),
    (r"\w+ has (\d+) \w+ and gives away (\d+)\. How many \w+ are left\?", lambda a, b: a - b),
    (r"Solve for x: x \+ (\d+) = (\d+)\.", lambda b, c: c - b),
    (r"What is (\d+) \+ (\d+) - (\d+)\?", lambda a, b, c: a + b - c),
)


def _true_value(prompt: str) -> int:
    for pattern, value in _MATH_TEMPLATES:
        if match := re.fullmatch(pattern, prompt):
            return value(*map(int, match.groups()))
    raise AssertionError(f"prompt matches no math template: {prompt}")


def _check_trace(trace: str) -> tuple[int, int]:
    """Replay a trace (each 'a+b' / 'a-b' header, its columns right to left, then its result);
    returns the result and the number of columns."""
    pieces = trace.split("|")
    i, result, columns = 0, None, 0
    while i < len(pieces):
        header = re.fullmatch(r"(\d+)([+-])(\d+)", pieces[i])
        assert header, f"expected an operation at piece {i} of {trace}"
        a, op, b = int(header[1]), header[2], int(header[3])
        width = max(len(str(a)), len(str(b)))
        da, db = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
        flag = 0
        for col in range(width):
            step = pieces[i + 1 + col]
            if op == "+":
                m = re.fullmatch(r"(\d)\+(\d)(?:\+(1))?=(\d+) c(\d)", step)
                assert m, step
                x, y, carry, total, new = (int(g or 0) for g in m.groups())
                assert (x, y, carry) == (int(da[col]), int(db[col]), flag), step
                assert total == x + y + carry and new == total // 10, step
            else:
                m = re.fullmatch(r"(\d+)-(\d)(?:-(1))?=(\d) b(\d)", step)
                assert m, step
                top, y, borrow, digit, new = (int(g or 0) for g in m.groups())
                assert (top, y, borrow) == (int(da[col]) + 10 * new, int(db[col]), flag), step
                assert digit == top - y - borrow, step
            flag = new
        result, columns = int(pieces[i + 1 + width]), columns + width
        assert result == (a + b if op == "+" else a - b)
        assert op == "+" or flag == 0, f"subtraction left a borrow: {trace}"
        i += width + 2
        if i < len(pieces):
            assert int(re.match(r"\d+", pieces[i])[0]) == result, f"a next step must start from {result}"
    assert result is not None
    return result, columns


def test_math_gold_is_the_true_value_and_trace_replays(rows):
    seen_templates = set()
    for row in rows["math", "train"] + rows["math", "test"]:
        value = _true_value(row["prompt"])
        seen_templates.add(next(p for p, _ in _MATH_TEMPLATES if re.fullmatch(p, row["prompt"])))
        assert value >= 0
        assert row["gold"] == str(value)
        boxed = f"The answer is \\boxed{{{value}}}."
        if row["thinking"]:
            assert row["answer"] == boxed
            assert row["thinking"].split("|")[-1] == row["gold"]
            assert _check_trace(row["thinking"]) == (value, row["steps"])
        else:  # the one fact, stated in the answer: "8-3=5. The answer is ..."
            assert row["steps"] == 1, "only a one-step problem may come without a trace"
            a, op, b, result = re.fullmatch(r"(\d)([+-])(\d)=(\d+)\. " + re.escape(boxed), row["answer"]).groups()
            assert int(result) == value == (int(a) + int(b) if op == "+" else int(a) - int(b))
    assert len(seen_templates) == len(_MATH_TEMPLATES)


def test_math_is_mostly_multi_step_and_half_its_one_step_facts_have_no_trace(rows):
    batch = rows["math", "train"]
    one_step = [r for r in batch if r["steps"] == 1]
    assert 0.1 < len(one_step) / len(batch) < 0.3
    assert 0.3 < sum(not r["thinking"] for r in one_step) / len(one_step) < 0.7
    assert all(r["thinking"] for r in batch if r["steps"] > 1)
    bare = [r for r in batch if re.fullmatch(r"What is \d{4} \+ \d{4}\?", r["prompt"])]
    assert 0.15 < len(bare) / len(batch) < 0.35
    assert max(len(r["thinking"]) for r in bare) <= 120


def test_a_stated_fact_is_the_text_of_its_trace_column(rows):
    """A trace-less answer states its fact exactly as a trace writes that column (no carry in), so the
    sums the traces teach are the ones a direct answer needs."""
    facts = [r for r in rows["math", "train"] if not r["thinking"]]
    assert facts
    for row in facts:
        a, op, b, value = re.fullmatch(r"(\d)([+-])(\d)=(\d+)\. .*", row["answer"]).groups()
        column = generators._column_trace(int(a), op, int(b))[0][1]
        assert column.split(" ")[0] == f"{a}{op}{b}={value}"


def test_trace_checker_catches_a_wrong_column():
    good = "4821+3796|1+6=7 c0|2+9=11 c1|8+7+1=16 c1|4+3+1=8 c0|8617"
    assert _check_trace(good) == (8617, 4)
    for wrong in ("2+9=12 c1", "2+9+1=12 c1", "2+9=11 c0"):
        with pytest.raises(AssertionError):
            _check_trace(good.replace("2+9=11 c1", wrong))


# ---------------------------------------------------------------- science

_FORMULA_OPS = {"average speed": "/", "density": "/", "current in amperes": "/", "power in watts": "/",
                "net force": "*", "work is done": "*", "momentum": "*"}


def test_science_formula_answers_are_right(rows):
    seen = set()
    for row in rows["science", "train"] + rows["science", "test"]:
        if " A) " in row["prompt"]:
            continue
        key = next(k for k in _FORMULA_OPS if k in row["prompt"])
        x, y = map(int, re.findall(r"\d+", row["prompt"]))
        op = _FORMULA_OPS[key]
        value = x / y if op == "/" else x * y
        assert value == int(value) and row["gold"] == str(int(value)), row
        assert row["answer"] == f"The answer is \\boxed{{{row['gold']}}}."
        assert row["thinking"].endswith(f"= {x} {op} {y} = {row['gold']}")
        seen.add(key)
    assert seen == set(_FORMULA_OPS)


def test_science_choice_gold_points_at_the_true_fact(rows):
    by_question = {fact.question: fact for fact in FACTS}
    checked = 0
    for row in rows["science", "train"] + rows["science", "test"]:
        if " A) " not in row["prompt"]:
            continue
        question, listed = row["prompt"].split(" A) ", 1)
        options = dict(re.findall(r"([A-D])\) (.+?)(?= [B-D]\) |$)", "A) " + listed))
        fact = by_question[question]
        assert sorted(options) == ["A", "B", "C", "D"] and len(set(options.values())) == 4
        assert [o for o in options.values() if o == fact.answer] == [fact.answer]
        assert set(options.values()) - {fact.answer} <= set(fact.distractors)
        assert options[row["gold"]] == fact.answer
        assert row["answer"] == f"The answer is \\boxed{{{row['gold']}}}."
        checked += 1
    assert checked > 100
    golds = {r["gold"] for r in rows["science", "train"] if " A) " in r["prompt"]}
    assert golds == {"A", "B", "C", "D"}


# ---------------------------------------------------------------- code

def _run_tests(code: str, tests: list[str]) -> bool:
    namespace: dict[str, object] = {}
    exec(code, namespace)
    try:
        for test in tests:
            exec(test, namespace)
    except AssertionError:
        return False
    return True


def test_code_reference_passes_and_a_stub_fails(rows):
    for row in rows["code", "train"] + rows["code", "test"]:
        code = re.fullmatch(r"```python\n(.*)\n```", row["answer"], re.DOTALL)[1]
        assert row["gold"] == "" and 3 <= len(row["tests"]) <= 4
        assert all(t.startswith("assert ") for t in row["tests"])
        assert _run_tests(code, row["tests"]), row
        name, arg = re.match(r"def (\w+)\((\w+)\):", code).groups()
        assert f"{name}({arg})" in row["prompt"]
        assert not _run_tests(f"def {name}({arg}):\n    return None", row["tests"]), row
        assert not _run_tests(f"def {name}({arg}):\n    return {arg}", row["tests"]), row
        first_expected = row["tests"][0].rsplit(" == ", 1)[1]
        assert not _run_tests(f"def {name}({arg}):\n    return {first_expected}", row["tests"]), row


# ---------------------------------------------------------------- ifeval

def _break(text: str, constraint: str) -> str:
    """An answer that violates exactly this constraint."""
    kind, _, arg = constraint.partition(":")
    return {
        "lowercase": lambda: text.upper(),
        "uppercase": lambda: text.lower(),
        "quoted": lambda: text.strip('"'),
        "max_words": lambda: text + " more" * (int(arg) + 1),
        "min_words": lambda: " ".join(text.split()[: int(arg) - 1]),
        "lines": lambda: text + "\nExtra",
        "include": lambda: re.sub(arg, "", text, flags=re.IGNORECASE),
        "exclude": lambda: f"{text} {arg}",
        "start_with": lambda: "Well, " + text,
        "end_with": lambda: text + " Bye.",
    }[kind]()


def test_ifeval_answers_meet_constraints_and_broken_ones_do_not(rows):
    kinds = set()
    for row in rows["ifeval", "train"] + rows["ifeval", "test"]:
        assert 1 <= len(row["constraints"]) <= 2 and row["gold"] == ""
        for constraint in row["constraints"]:
            kinds.add(constraint.partition(":")[0])
            assert _satisfies(row["answer"], constraint), (row, constraint)
            assert not _satisfies(_break(row["answer"], constraint), constraint), (row, constraint)
    assert kinds == {"lowercase", "uppercase", "quoted", "max_words", "min_words", "lines",
                     "include", "exclude", "start_with", "end_with"}


@pytest.mark.parametrize("text, constraint, ok", [
    ("the sea is calm.", "lowercase", True),
    ("The sea is calm.", "lowercase", False),
    ("THE SEA.", "uppercase", True),
    ('"The sea."', "quoted", True),
    ('The "sea".', "quoted", False),
    ("one two three", "max_words:3", True),
    ("one two three four", "max_words:3", False),
    ("one two", "min_words:3", False),
    ("Apple\n\nPear\n", "lines:2", True),
    ("Apple\nPear\nPlum", "lines:2", False),
    ("Boats leave the harbor.", "include:harbor", True),
    ("Boats leave the harbors.", "include:harbor", False),
    ("Boats leave the HARBOR.", "exclude:harbor", False),
    ("Here it is: rain.", "start_with:Here it is:", True),
    ("Rain. That is all.", "end_with:That is all.", True),
    ("Rain. That is all", "end_with:That is all.", False),
])
def test_satisfies_semantics(text, constraint, ok):
    assert _satisfies(text, constraint) is ok


def test_unknown_constraint_is_rejected():
    with pytest.raises(ValueError, match="shout"):
        _satisfies("hi", "shout")


# ---------------------------------------------------------------- safety

def test_safety_labels_are_balanced_and_answers_match_them(rows):
    for split in ("train", "test"):
        batch = rows["safety", split]
        refuse = [r for r in batch if r["gold"] == "refuse"]
        comply = [r for r in batch if r["gold"] == "comply"]
        assert len(refuse) + len(comply) == len(batch)
        assert 0.35 < len(refuse) / len(batch) < 0.65
        assert all(r["answer"].startswith("I can't help with") for r in refuse)
        assert not any(re.match(r"(I can't|I cannot|I won't|Sorry)", r["answer"]) for r in comply)


def test_benign_look_alikes_share_vocabulary_with_harmful_requests(rows):
    batch = rows["safety", "train"]
    for word in ("kill", "break into", "track"):
        assert {r["gold"] for r in batch if word in r["prompt"]} == {"refuse", "comply"}, word
