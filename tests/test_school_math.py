"""School math eval data: deterministic generation (across processes and hash seeds), module spread,
numeric answers, answer extraction, numeric comparison and the prompt formats."""

import collections
import importlib.util
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from phikit.eval import school_math
from phikit.eval.school_math import (DEFAULT_MODULES, chat_messages_for, extract_number, generate_problems,
                                     numbers_equal, prompt_for)

needs_generator = pytest.mark.skipif(importlib.util.find_spec("mathematics_dataset") is None,
                                     reason="mathematics_dataset not installed")

# One composed module as well: it goes through the generator's entity shuffling, which follows the hash seed
MODULES = DEFAULT_MODULES + ("algebra__linear_1d_composed",)
# The module loaded by path, without the package (and torch) around it: faster to start
DUMP = ("import importlib.util, json; "
        f"spec = importlib.util.spec_from_file_location('school_math', {school_math.__file__!r}); "
        "sm = importlib.util.module_from_spec(spec); spec.loader.exec_module(sm); "
        "modules = sm.DEFAULT_MODULES + ('algebra__linear_1d_composed',); "
        "print(json.dumps(sm.generate_problems(60, seed=7, modules=modules)))")


@needs_generator
def test_same_problems_in_separate_processes():
    # variable names and entity order came from set order, i.e. from the hash seed: give each process its own
    procs = [subprocess.Popen([sys.executable, "-c", DUMP], env=dict(os.environ, PYTHONHASHSEED=hash_seed),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for hash_seed in ("1", "2")]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outs.append(out)
    assert outs[0] == outs[1]
    assert json.loads(outs[0]) == generate_problems(60, seed=7, modules=MODULES)


@needs_generator
def test_count_spread_ids_and_prefix():
    rows = generate_problems(45)
    k = len(DEFAULT_MODULES)
    assert len(rows) == 45
    assert [r["module"] for r in rows] == [DEFAULT_MODULES[i % k] for i in range(45)]
    counts = collections.Counter(r["module"] for r in rows)
    assert set(counts) == set(DEFAULT_MODULES) and max(counts.values()) - min(counts.values()) <= 1
    assert len({r["id"] for r in rows}) == 45
    assert all(set(r) == {"id", "module", "question", "answer"} for r in rows)
    assert generate_problems(20) == rows[:20]                  # a longer list extends a shorter one
    assert generate_problems(20, seed=1) != rows[:20]
    assert generate_problems(0) == []


@needs_generator
def test_global_random_state_is_left_alone():
    random.seed(5)
    np.random.seed(5)
    expected = random.random(), np.random.rand()
    random.seed(5)
    np.random.seed(5)
    generate_problems(25)
    assert (random.random(), np.random.rand()) == expected


@needs_generator
def test_every_answer_is_a_number():
    rows = generate_problems(10 * len(MODULES), seed=3, modules=MODULES)
    for r in rows:
        assert extract_number(r["answer"]) == r["answer"], r
        assert numbers_equal(r["answer"], r["answer"]), r
        assert len(r["question"]) <= 160 and r["question"].strip(), r


@needs_generator
def test_module_choice_and_errors():
    rows = generate_problems(6, modules=("numbers__gcd", "measurement__time"))
    assert [r["module"] for r in rows] == ["numbers__gcd", "measurement__time"] * 3
    assert all(":" not in r["answer"] for r in rows)           # clock-time answers are drawn again
    assert generate_problems(4, difficulty="hard") != generate_problems(4)
    with pytest.raises(ValueError, match="unknown"):
        generate_problems(3, modules=("arithmetic__nope",))
    with pytest.raises(ValueError, match="more than once"):
        generate_problems(3, modules=("numbers__gcd", "numbers__gcd"))
    with pytest.raises(ValueError, match="difficulty"):
        generate_problems(3, difficulty="impossible")
    with pytest.raises(RuntimeError, match="plain-number"):
        generate_problems(1, modules=("numbers__is_prime",))   # its answers are True / False


def test_missing_generator_gives_a_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "mathematics_dataset", None)
    school_math._library.cache_clear()
    school_math._module_table.cache_clear()
    try:
        with pytest.raises(ImportError, match="pip install mathematics_dataset"):
            generate_problems(1)
    finally:
        school_math._library.cache_clear()
        school_math._module_table.cache_clear()


@pytest.mark.parametrize("text, number", [
    ("The answer is 42.", "42"),
    ("#### 42", "42"),
    ("\\boxed{42}", "42"),
    ("-3", "-3"),
    ("1,234", "1234"),
    ("3.50", "3.50"),
    ("2/3", "2/3"),
    ("It is 7.", "7"),
    ("So we get 1,234,567.89 in total", "1234567.89"),
    ("First 12, then 15", "15"),
    ("x = 5 and y = 7. The answer is 3. Checking: 3 + 4 = 7", "3"),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("The final answer is $\\boxed{\\frac{2}{3}}$.", "2/3"),
    ("The final answer is \\boxed{-0.5}.", "-0.5"),
    ("**Answer:** -12", "-12"),
    ("Answer: -2/3.", "-2/3"),
    ("The answer is $1,234.50.", "1234.50"),
    ("The answer is \u22127.", "-7"),
    ("5-3=2", "2"),
    ("The answer is\n\nwell, 8 or 9", "9"),                     # a marker without a number is ignored
    ("x_1 = 4", "4"),
    ("The answer is 6 / 2 = 3", "6/2"),
    ("about 1e5", "1e5"),
    ("no number here", None),
    ("", None),
])
def test_extract_number(text, number):
    assert extract_number(text) == number


@pytest.mark.parametrize("predicted, gold, equal", [
    ("42", "42", True),
    ("42.0", "42", True),
    ("3.50", "3.5", True),
    ("-0", "0", True),
    ("1,000", "1000", True),
    ("4/6", "2/3", True),
    ("-2/3", "-2/3", True),
    ("0.6666667", "2/3", True),
    ("0.5", "1/2", True),
    ("+5", "5", True),
    ("2.0000000001", "2", True),
    ("0.667", "2/3", False),
    ("0.00007001", "0.00007", False),                          # a rounding answer must be the rounded number
    ("2/3", "3/2", False),
    ("-3", "3", False),
    ("43", "42", False),
    (None, "42", False),
    ("forty-two", "42", False),
    ("1/0", "1", False),
])
def test_numbers_equal(predicted, gold, equal):
    assert numbers_equal(predicted, gold) is equal


SHOTS = [{"question": "What is 2 + 3?", "answer": "5"}, {"question": "Divide 1 by 3.", "answer": "1/3"}]


def test_prompt_for_base_model():
    assert prompt_for("What is 7*6?", SHOTS) == ("Question: What is 2 + 3?\nAnswer: 5\n\n"
                                                 "Question: Divide 1 by 3.\nAnswer: 1/3\n\n"
                                                 "Question: What is 7*6?\nAnswer:")
    assert prompt_for("What is 7*6?", []) == "Question: What is 7*6?\nAnswer:"


def test_chat_messages_for_chat_model():
    messages = chat_messages_for("What is 7*6?", SHOTS)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("What is 2 + 3?") and messages[1]["content"] == "The answer is 5."
    assert messages[2]["content"].startswith("Divide 1 by 3.") and messages[3]["content"] == "The answer is 1/3."
    assert messages[4]["content"].startswith("What is 7*6?")
    assert all("The answer is N." in m["content"] for m in messages if m["role"] == "user")
    assert extract_number(messages[3]["content"]) == "1/3"
    assert chat_messages_for("What is 7*6?", []) == [messages[-1]]
