"""Generated arithmetic multiple-choice problems: the ``calc`` task family.

After the calculation probe of Chen et al. (2023): operations ``add``, ``sub``,
``mul``, ``div``, ``mix2`` (two operations) and ``mix3`` (three), on ``int`` or
``float`` operands whose integer part has 1-2, 3-4 or 5-6 digits. Each problem
has four choices: the answer and three near misses written the same way.

Rules a reader of the results needs to know:

- Every value is handled as an integer number of *units* (1 for ints, 0.01 for
  floats) and arithmetic is exact (``Fraction``), so no float noise or
  exponent notation can reach a prompt.
- Float operands have exactly two decimals; a float answer is the exact result
  rounded half away from zero to two decimals and is always written with two
  decimals ("25.00", "-3.10").
- Int division is exact: the divisor and the quotient are drawn from the digit
  range and the dividend is their product (so it may have more digits). Float
  division divides two in-range operands, the larger by the smaller.
- ``sub`` and ``div`` put the larger operand first; mixed expressions may be
  negative. A mixed expression is a sum or difference of terms, each a number
  or a product/quotient of two numbers (usual precedence, no parentheses), with
  at least one additive and one multiplicative operation.
- Problem ``j`` of a combination (op, type, digits) depends only on the seed,
  the combination and ``j``, so ``calc`` and ``calc-add-int-1-2`` share items
  and a smaller ``limit`` always gives a prefix.
"""

from __future__ import annotations

import difflib
import itertools
import random
from dataclasses import dataclass
from fractions import Fraction

from lcprobe.errors import TaskError

OPS: tuple[str, ...] = ("add", "sub", "mul", "div", "mix2", "mix3")
TYPES: tuple[str, ...] = ("int", "float")
DIGITS: tuple[str, ...] = ("1-2", "3-4", "5-6")

#: Bumped whenever a change to this module changes generated items, so task
#: hashes (and any cached results keyed on them) change with it.
GENERATOR_VERSION = 1

DEFAULT_N_MIX = 300
DEFAULT_N_VARIANT = 100
DEFAULT_SEED = 0
N_CHOICES = 4

INSTRUCTION = "Work out each calculation and reply with the resulting number alone."
DEMOS: tuple[dict, ...] = (
    {"question": "What is 36 + 47?", "answer": "83"},
    {"question": "What is 912 / 38?", "answer": "24"},
    {"question": "What is 15.75 - 4.20?", "answer": "11.55"},
    {"question": "What is 7 + 8 * 6?", "answer": "55"},
)

_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


@dataclass(frozen=True)
class CalcSpec:
    """Which (op, type, digits) combinations a calc task name selects."""

    name: str
    ops: tuple[str, ...]
    types: tuple[str, ...]
    digits: tuple[str, ...]

    def combos(self) -> list[tuple[str, str, str]]:
        # Op varies fastest, then type, then digits, so any prefix of the
        # round-robin covers as many operations as possible.
        return [(o, t, d) for d in self.digits for t in self.types for o in self.ops]

    def default_n(self) -> int:
        return DEFAULT_N_MIX if self.name == "calc" else DEFAULT_N_VARIANT


@dataclass(frozen=True)
class Problem:
    question: str  # "What is 12 + 7?"
    expression: str  # "12 + 7"
    choices: tuple[str, ...]
    correct: int
    meta: dict


def all_names() -> list[str]:
    """Every calc task name accepted by :func:`parse_name`."""
    names = []
    for op, typ, dig in itertools.product((None, *OPS), (None, *TYPES), (None, *DIGITS)):
        names.append("-".join(p for p in ("calc", op, typ, dig) if p))
    return names


def parse_name(name: str) -> CalcSpec:
    """``calc[-<op>][-<int|float>][-<digits>]``, each part optional, in that order."""
    if name != "calc" and not name.startswith("calc-"):
        raise TaskError(f"not a calc task name: {name!r}")
    tokens = name.split("-")[1:]
    ops, types, digits = OPS, TYPES, DIGITS
    i = 0
    if i < len(tokens) and tokens[i] in OPS:
        ops, i = (tokens[i],), i + 1
    if i < len(tokens) and tokens[i] in TYPES:
        types, i = (tokens[i],), i + 1
    if i + 1 < len(tokens) and f"{tokens[i]}-{tokens[i + 1]}" in DIGITS:
        digits, i = (f"{tokens[i]}-{tokens[i + 1]}",), i + 2
    if i != len(tokens):
        close = difflib.get_close_matches(name, all_names(), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TaskError(
            f"unknown calc variant {name!r} (expected calc[-<{'|'.join(OPS)}>]"
            f"[-<int|float>][-<{'|'.join(DIGITS)}>]){hint}"
        )
    return CalcSpec(name=name, ops=ops, types=types, digits=digits)


def generate(spec: CalcSpec, n: int, seed: int = DEFAULT_SEED) -> list[Problem]:
    """``n`` problems cycling through ``spec.combos()``; deterministic in ``seed``."""
    combos = spec.combos()
    problems = []
    for i in range(n):
        op, typ, dig = combos[i % len(combos)]
        # A string seed is hashed with SHA-512 by random.Random, so this is
        # stable across processes and Python hash randomisation.
        rng = random.Random(f"calc/{GENERATOR_VERSION}/{seed}/{op}-{typ}-{dig}/{i // len(combos)}")
        problems.append(_problem(rng, op, typ, dig))
    return problems


def format_units(units: int, typ: str) -> str:
    """Write a value given in units (1 or 0.01) the way answers are written."""
    if typ == "int":
        return str(units)
    sign = "-" if units < 0 else ""
    whole, cents = divmod(abs(units), 100)
    return f"{sign}{whole}.{cents:02d}"


def to_units(value: Fraction, typ: str) -> int:
    """Exact value -> units, rounding half away from zero for floats."""
    scaled = value if typ == "int" else value * 100
    if scaled.denominator == 1:
        return int(scaled)
    if typ == "int":
        raise AssertionError(f"int calc result is not whole: {value}")
    magnitude = int(abs(scaled) + Fraction(1, 2))
    return magnitude if scaled > 0 else -magnitude


# --- generation -------------------------------------------------------------


def _operand(rng: random.Random, digits: str, typ: str) -> tuple[Fraction, str]:
    lo, hi = (int(x) for x in digits.split("-"))
    d = rng.randint(lo, hi)
    whole = rng.randint(10 ** (d - 1), 10**d - 1)  # zero excluded: it can divide
    if typ == "int":
        return Fraction(whole), str(whole)
    cents = rng.randint(0, 99)
    return Fraction(whole * 100 + cents, 100), f"{whole}.{cents:02d}"


def _pair(rng: random.Random, sym: str, digits: str, typ: str) -> tuple[Fraction, str]:
    """One binary operation on fresh operands: (value, text)."""
    (a, at), (b, bt) = _operand(rng, digits, typ), _operand(rng, digits, typ)
    if sym == "/" and typ == "int":
        # b is the divisor and a the quotient: show a*b / b so it is exact.
        return a, f"{a * b} / {bt}"
    if sym in "-/" and a < b:
        (a, at), (b, bt) = (b, bt), (a, at)
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[sym]
    return value, f"{at} {sym} {bt}"


# Where the multiplicative operations sit in a mixed expression of k
# operations: never two in a row (a term has at most two numbers), and at
# least one additive and one multiplicative operation.
_MIX_PATTERNS = {
    2: ((True, False), (False, True)),
    3: ((True, False, False), (False, True, False), (False, False, True), (True, False, True)),
}


def _mix(rng: random.Random, k: int, digits: str, typ: str) -> tuple[Fraction, str]:
    pattern = rng.choice(_MIX_PATTERNS[k])
    terms: list[tuple[Fraction, str]] = []
    signs: list[str] = []
    i = 0
    while i < k + 1:  # i indexes numbers; number i is followed by op i
        if i < k and pattern[i]:
            terms.append(_pair(rng, rng.choice("*/"), digits, typ))
            i += 2
        else:
            terms.append(_operand(rng, digits, typ))
            i += 1
        if i <= k:
            signs.append(rng.choice("+-"))
    value, text = terms[0]
    for sign, (tv, tt) in zip(signs, terms[1:]):
        value = value + tv if sign == "+" else value - tv
        text = f"{text} {sign} {tt}"
    return value, text


def _problem(rng: random.Random, op: str, typ: str, digits: str) -> Problem:
    if op in _SYMBOL:
        value, expr = _pair(rng, _SYMBOL[op], digits, typ)
    else:
        value, expr = _mix(rng, int(op[-1]), digits, typ)
    answer = to_units(value, typ)
    values = [answer, *distractors(rng, answer)]
    rng.shuffle(values)
    return Problem(
        question=f"What is {expr}?",
        expression=expr,
        choices=tuple(format_units(v, typ) for v in values),
        correct=values.index(answer),
        meta={"op": op, "type": typ, "digits": digits},
    )


def plausible(candidate: int, answer: int) -> bool:
    """The near-miss rule: same sign, and within half the answer or 20 units."""
    if candidate == answer or (candidate < 0) != (answer < 0):
        return False
    return abs(candidate - answer) <= max(abs(answer) // 2, 20)


def distractors(rng: random.Random, answer: int, k: int = N_CHOICES - 1) -> list[int]:
    """``k`` distinct near misses of ``answer`` (in units), the kind of slips a
    person or model makes: last digit off by one, off by a few, off by ten or a
    hundred units, or one non-leading digit changed by 1-3."""

    def last_digit() -> int:
        return answer + rng.choice((-1, 1))

    def few() -> int:
        return answer + rng.choice((-1, 1)) * rng.randint(2, 9)

    def tens() -> int:
        return answer + rng.choice((-10, 10, -100, 100))

    def digit() -> int:
        s = str(abs(answer))
        if len(s) < 2:
            return answer
        pos = rng.randrange(1, len(s))  # never the leading digit: too far off
        new = int(s[pos]) + rng.choice((-3, -2, -1, 1, 2, 3))
        if not 0 <= new <= 9:
            return answer
        changed = int(s[:pos] + str(new) + s[pos + 1 :])
        return changed if answer >= 0 else -changed

    strategies = (last_digit, few, tens, digit, digit)
    chosen: list[int] = []
    for _ in range(200):
        if len(chosen) == k:
            return chosen
        c = rng.choice(strategies)()
        if plausible(c, answer) and c not in chosen:
            chosen.append(c)
    # Tiny answers can exhaust the strategies (e.g. 0 allows no negatives):
    # fall back to the nearest unused values, which are always plausible.
    step = 1
    while len(chosen) < k:
        for c in (answer + step, answer - step):
            if len(chosen) < k and plausible(c, answer) and c not in chosen:
                chosen.append(c)
        step += 1
    return chosen
