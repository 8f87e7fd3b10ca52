"""School math: offline generation tasks whose answer is one number, and how to score a model's reply.

Problems come from DeepMind's `mathematics_dataset` generator (`pip install mathematics_dataset`), called
module by module at its "train-easy" difficulty with a fixed seed, so a problem set is reproducible
byte for byte without downloading anything. Only problems whose answer is a plain number (an integer, a
decimal or a fraction such as ``-2/3``, as the generator writes it) are kept.

Scoring is by answer extraction: `extract_number` takes the final number of a reply (an explicit
"The answer is ...", "#### ..." or ``\\boxed{...}`` first, else the last number), and `numbers_equal`
compares it with the gold answer as a number. `prompt_for` (base models, k-shot "Question:/Answer:")
and `chat_messages_for` (chat models) build the inputs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import math
import random
import re
import sys
import types
import warnings
from fractions import Fraction

# Modules whose every answer is a single number (or, for measurement__time, about half of them: the
# clock-time answers are resampled). Left out: answers that are lists, expressions, booleans, letters
# of a multiple choice or numbers in other bases; the *_composed variants (with numpy>=2 about one call
# in ten fails inside the generator, see _sample_module); probability__swr_p_level_set (60 ms a problem).
DEFAULT_MODULES: tuple[str, ...] = (
    "arithmetic__add_or_sub",
    "arithmetic__add_sub_multiple",
    "arithmetic__mul",
    "arithmetic__div",
    "arithmetic__mul_div_multiple",
    "arithmetic__mixed",
    "arithmetic__nearest_integer_root",
    "numbers__round_number",
    "numbers__gcd",
    "numbers__lcm",
    "numbers__div_remainder",
    "numbers__place_value",
    "algebra__linear_1d",
    "algebra__linear_2d",
    "algebra__sequence_next_term",
    "polynomials__evaluate",
    "measurement__conversion",
    "measurement__time",
    "probability__swr_p_sequence",
)

DIFFICULTIES = {"easy": 0, "medium": 1, "hard": 2}    # the generator's train-easy / -medium / -hard
STOP_SEQUENCES = ("\nQuestion:",)                    # end a base model's answer before it writes a new question
INSTRUCTION = 'Solve the problem. End your reply with "The answer is N." where N is the final number.'

_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?|-?\d+/\d+")
_MAX_MISSES = 200                                    # consecutive unusable samples before a module is given up


# ----------------------------------------------------------------------------------------------- generation

@functools.lru_cache(maxsize=None)
def _library() -> types.SimpleNamespace:
    """The generator's modules, imported on first use."""
    try:
        importlib.import_module("mathematics_dataset")
    except ImportError as e:
        raise ImportError("school math problems need DeepMind's generator: pip install mathematics_dataset") from e
    # mathematics_dataset 1.0.1 imports sympy.solvers.diophantine.base_solution_linear, which newer sympy
    # keeps only in the submodule sympy.solvers.diophantine.diophantine: re-export it under the old name.
    dioph = importlib.import_module("sympy.solvers.diophantine")
    if not hasattr(dioph, "base_solution_linear"):
        dioph.base_solution_linear = importlib.import_module(
            "sympy.solvers.diophantine.diophantine").base_solution_linear
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        modules = importlib.import_module("mathematics_dataset.modules.modules")
        composition = importlib.import_module("mathematics_dataset.util.composition")
        settings = importlib.import_module("mathematics_dataset.generate_settings")
    users_of_random = [m for name, m in sorted(sys.modules.items())
                       if name.startswith("mathematics_dataset.") and getattr(m, "random", None) is random]
    try:                                             # sympy's own generator (randprime draws from it)
        sympy_rng = importlib.import_module("sympy.core.random").rng
    except (ImportError, AttributeError):            # older sympy draws from the global `random`
        sympy_rng = None
    return types.SimpleNamespace(modules=modules, composition=composition, settings=settings, sympy_rng=sympy_rng,
                                 users_of_random=users_of_random)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}__{key}" if prefix else key
        flat.update(_flatten(value, name) if isinstance(value, dict) else {name: value})
    return flat


@functools.lru_cache(maxsize=None)
def _module_table(difficulty: str) -> dict:
    """{"arithmetic__mul": sampler, ...} at one training difficulty, as the generator's train-easy etc. build it."""
    level = DIFFICULTIES[difficulty]

    def entropy_fn(range_):                          # generate._make_entropy_fn(level, 3)
        lo, hi = range_
        return lo + level / 3 * (hi - lo), lo + (level + 1) / 3 * (hi - lo)

    return _flatten(_library().modules.train(entropy_fn))


def _module_seed(seed: int, name: str) -> int:
    """A seed for one module, stable across processes (unlike hash()), so each module has its own stream."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:4], "big")


@contextlib.contextmanager
def _rng_state_restored(lib):
    """Leaves the global `random`, numpy and sympy generators as they were."""
    import numpy as np
    saved = random.getstate(), np.random.get_state(), lib.sympy_rng.getstate() if lib.sympy_rng else None
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        if lib.sympy_rng:
            lib.sympy_rng.setstate(saved[2])


def _seed_all(lib, seed: int) -> None:
    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    if lib.sympy_rng:
        lib.sympy_rng.seed(seed)


@contextlib.contextmanager
def _hash_independent_order(composition):
    """Makes the generator's two draws from sets independent of the process's hash seed, while in use.

    Context.pop picks a variable name with random.choice(list(a set of letters)), and expand_entities
    shuffles list(a set of objects): the list's order (so the pick) follows PYTHONHASHSEED and object
    addresses. The stand-ins below draw from a sorted / insertion-ordered list instead (the same
    distribution). Not thread-safe: the generator's global state is shared anyway.
    """
    context_cls, old_pop, old_expand = composition.Context, composition.Context.pop, composition.expand_entities

    def pop(self):
        allowed = sorted(composition._ALLOWED_SYMBOLS - self._relation_symbols - self._self_symbols
                         - self._child_symbols)
        if not allowed:
            raise ValueError("Ran out of symbols")
        symbol = random.choice(allowed)
        self._self_symbols.add(symbol)
        return symbol

    def expand_entities(context, **kwargs):
        entities = dict.fromkeys(context.child_entities)          # ordered set (Entity hashes by identity)
        for key, value in kwargs.items():
            if isinstance(value, composition.Entity):
                entities[value] = None
                kwargs[key] = value.handle
        entities = list(entities)
        random.shuffle(entities)
        descriptions = []
        for entity in entities:
            descriptions.append(entity.child_description)
            if not entity.expression_used:
                descriptions.append(entity.description)
        return " ".join(s for s in descriptions if s), kwargs

    context_cls.pop, composition.expand_entities = pop, expand_entities
    try:
        yield
    finally:
        context_cls.pop, composition.expand_entities = old_pop, old_expand


def _integral(x):
    return int(x) if isinstance(x, float) and x.is_integer() else x


class _LenientRandom:
    """The `random` module as the generator knew it: randint/randrange take integral floats (50.0), which
    Python 3.12 refuses (3.10 and 3.11 convert them, with a DeprecationWarning); the draws are the same."""

    def __getattr__(self, name):
        return getattr(random, name)

    @staticmethod
    def randint(a, b):
        return random.randint(_integral(a), _integral(b))

    @staticmethod
    def randrange(start, stop=None, step=1):
        return random.randrange(_integral(start), _integral(stop), _integral(step))


@contextlib.contextmanager
def _lenient_random(users):
    """Gives the generator's modules a _LenientRandom as their `random` while in use."""
    for module in users:
        module.random = _LenientRandom()
    try:
        yield
    finally:
        for module in users:
            module.random = random


def _usable(question: str, answer: str, settings) -> bool:
    """The generator's own length limits (its generate.sample_from_module), and a plain-number answer."""
    return (len(question) <= settings.MAX_QUESTION_LENGTH and len(answer) <= settings.MAX_ANSWER_LENGTH
            and _PLAIN_NUMBER.fullmatch(answer) is not None)


def _sample_module(name: str, sampler, count: int, lib) -> list[tuple[str, str]]:
    """`count` (question, answer) pairs from one module, drawing again when a sample is unusable."""
    pairs, misses, error = [], 0, None
    while len(pairs) < count:
        try:
            problem = sampler()
            question, answer = str(problem.question), str(problem.answer)
        except AttributeError as e:
            # numpy>=2 removed ndarray.itemset and np.object, which some of the generator's polynomial
            # sampling still uses; such a draw is dropped like an over-long one (deterministically).
            question, answer, error = "", "", e
        if question and _usable(question, answer, lib.settings):
            pairs.append((question, answer))
            misses = 0
            continue
        misses += 1
        if misses >= _MAX_MISSES:
            raise RuntimeError(f"{name}: no problem with a plain-number answer in {_MAX_MISSES} draws "
                               "(it is not a numeric-answer module, or it fails with this numpy)") from error
    return pairs


def _check_modules(modules, table: dict) -> tuple[str, ...]:
    names = (modules,) if isinstance(modules, str) else tuple(modules)
    if not names:
        raise ValueError("no modules given")
    if len(set(names)) != len(names):
        raise ValueError(f"modules are listed more than once: {names}")
    unknown = [m for m in names if m not in table]
    if unknown:
        raise ValueError(f"unknown mathematics_dataset modules {unknown}; known: {', '.join(sorted(table))}")
    return names


def generate_problems(n: int, seed: int = 1234, modules: tuple[str, ...] = DEFAULT_MODULES, *,
                      difficulty: str = "easy") -> list[dict]:
    """`n` problems {"id", "module", "question", "answer"}, round-robin over `modules` in the order given.

    The same (n, seed, modules, difficulty) gives the same problems in any process: each module is
    sampled from its own stream seeded by (seed, module name), so a longer list extends a shorter one
    (problem i of n is problem i of any larger n) and one module's problems do not depend on the others.
    Draw few-shot examples with another seed. The global `random`, numpy and sympy generators are
    left as they were; not thread-safe.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")
    lib = _library()
    with (_rng_state_restored(lib), _hash_independent_order(lib.composition), _lenient_random(lib.users_of_random),
          warnings.catch_warnings()):
        warnings.simplefilter("ignore", FutureWarning)   # the generator's np.object, deprecated by numpy
        table = _module_table(difficulty)
        names = _check_modules(modules, table)
        k = len(names)
        per_module = []
        for j, name in enumerate(names):
            _seed_all(lib, _module_seed(seed, name))
            per_module.append(_sample_module(name, table[name], len(range(j, n, k)), lib))
    rows = []
    for i in range(n):
        question, answer = per_module[i % k][i // k]
        rows.append({"id": f"school_math-{difficulty}-{seed}-{i:05d}", "module": names[i % k],
                     "question": question, "answer": answer})
    return rows


# ----------------------------------------------------------------------------------------------- scoring

# A number: an optional minus sign that is not a binary minus (5-3), digits with optional thousands
# separators, decimals and exponent, and an optional "/denominator". Not the tail of a word (x2, v2.0).
_NUMBER = re.compile(r"""
    (?: (?<![\w)]) - )?
    (?<![\w.])
    (?: (?: \d{1,3} (?:,\d{3})+ (?!\d) | \d+ ) (?:\.\d+)? | \.\d+ ) (?: [eE] [-+]? \d+ )?
    (?: [ \t]* / [ \t]* \d+ (?!\d|\.\d) )?
""", re.VERBOSE)
_ANSWER_IS = re.compile(r"\banswer[\s*]*(?:is\b|[:=])", re.IGNORECASE)
_HASHES = re.compile(r"####")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\}")


def _normalize_text(text: str) -> str:
    text = text.replace("\u2212", "-").replace("{,}", ",")
    return _LATEX_FRAC.sub(r"\1/\2", text)


def _clean_number(match: str) -> str:
    return re.sub(r"[,\s]", "", match)


def _first_number(text: str) -> str | None:
    m = _NUMBER.search(text)
    return _clean_number(m.group()) if m else None


def _braced(text: str, start: int) -> str:
    """The text from `start` up to the brace closing the one just before `start`."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return text[start:]


def _marked_numbers(text: str) -> list[tuple[int, str]]:
    """(position, number) for each explicit answer marker followed by a number."""
    found = []
    for m in _BOXED.finditer(text):
        found.append((m.start(), _first_number(_braced(text, m.end()))))
    for pattern in (_ANSWER_IS, _HASHES):
        for m in pattern.finditer(text):
            found.append((m.start(), _first_number(text[m.end():].split("\n", 1)[0])))
    return [(pos, num) for pos, num in found if num is not None]


def extract_number(text: str) -> str | None:
    """The final number of a model's reply, e.g. "1234" from "... The answer is 1,234.", or None.

    The number after the last explicit marker ("answer is"/"answer:", "####", \\boxed{...}) wins;
    without one, the last number in the text. Thousands separators are dropped; "2/3", "-3" and
    "3.50" are returned as written. Cut a base model's continuation at STOP_SEQUENCES first.
    """
    text = _normalize_text(text)
    marked = _marked_numbers(text)
    if marked:
        return max(marked)[1]
    numbers = _NUMBER.findall(text)
    return _clean_number(numbers[-1]) if numbers else None


def _to_fraction(s: str) -> Fraction | None:
    s = re.sub(r"[,\s]", "", s.replace("\u2212", "-")).rstrip(".").removeprefix("+")
    try:
        if "/" in s:
            num, den = s.split("/")
            return Fraction(num) / Fraction(den)
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def numbers_equal(predicted: str | None, gold: str) -> bool:
    """Whether two number strings are the same number: "1,000" = "1000", "-0" = "0", "4/6" = "2/3",
    "3.50" = "3.5"; when either is written as a decimal, up to a relative 1e-6 ("0.6666667" = "2/3")."""
    if predicted is None:
        return False
    p, g = _to_fraction(predicted), _to_fraction(gold)
    if p is None or g is None:
        return False
    if p == g:
        return True
    if any(c in s for s in (predicted, gold) for c in ".eE"):
        return math.isclose(float(p), float(g), rel_tol=1e-6, abs_tol=1e-12)
    return False


# ----------------------------------------------------------------------------------------------- prompts

def prompt_for(question: str, shots: list[dict]) -> str:
    """A k-shot prompt for a base model: "Question: ...\\nAnswer: ...\\n\\n" per shot, then the question."""
    parts = [f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots]
    return "".join(parts) + f"Question: {question}\nAnswer:"


def chat_messages_for(question: str, shots: list[dict]) -> list[dict]:
    """Messages for a chat model: each shot as a user turn and the assistant's "The answer is N." reply,
    then the question; every user turn carries the instruction to end with "The answer is N."."""
    messages = []
    for s in shots:
        messages.append({"role": "user", "content": f"{s['question']}\n\n{INSTRUCTION}"})
        messages.append({"role": "assistant", "content": f"The answer is {s['answer']}."})
    messages.append({"role": "user", "content": f"{question}\n\n{INSTRUCTION}"})
    return messages
