"""The calc generator, checked against an independent evaluation of each question."""

from __future__ import annotations

import re
from collections import Counter
from decimal import ROUND_HALF_UP, Decimal, localcontext
from fractions import Fraction

import pytest

from lcprobe.tasks import calc
from lcprobe.errors import TaskError
from lcprobe.tasks.task import load_task

INT_RE = re.compile(r"-?\d+")
FLOAT_RE = re.compile(r"-?\d+\.\d\d")
NUMBER = re.compile(r"\d+(?:\.\d+)?")
QUESTION = re.compile(r"What is (.+)\?")

ALL_VARIANTS = [f"calc-{o}-{t}-{d}" for o in calc.OPS for t in calc.TYPES for d in calc.DIGITS]


def evaluate(expr: str) -> Fraction:
    """Evaluate with Python's own precedence on exact Fractions."""
    assert re.fullmatch(r"[\d. +\-*/]+", expr), expr
    return eval(NUMBER.sub(lambda m: f"Fraction('{m.group()}')", expr), {"Fraction": Fraction})


def expected_answer(expr: str, typ: str) -> str:
    value = evaluate(expr)
    if typ == "int":
        assert value.denominator == 1, f"int problem with a fractional answer: {expr}"
        return str(value.numerator)
    with localcontext() as ctx:
        ctx.prec = 60
        d = Decimal(value.numerator) / Decimal(value.denominator)
        return str(d.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def units(text: str) -> int:
    return int(Decimal(text) * 100) if "." in text else int(text)


@pytest.fixture(scope="module")
def variant_items():
    return {name: load_task(name).items(limit=40) for name in ALL_VARIANTS}


def test_answers_are_correct(variant_items):
    for name, items in variant_items.items():
        typ = name.split("-")[2]
        for it in items:
            expr = QUESTION.search(it.context.rsplit("Q: ", 1)[1]).group(1)
            assert it.choices[it.correct[0]] == " " + expected_answer(expr, typ), (name, expr)


def test_distractors_distinct_plausible_same_format(variant_items):
    for name, items in variant_items.items():
        typ = name.split("-")[2]
        pattern = INT_RE if typ == "int" else FLOAT_RE
        for it in items:
            assert len(it.choices) == 4 and len(it.correct) == 1
            texts = [c.strip() for c in it.choices]
            assert len(set(texts)) == 4, texts
            assert all(pattern.fullmatch(t) for t in texts), texts
            assert all("e" not in t.lower() for t in texts)
            answer = units(texts[it.correct[0]])
            for i, t in enumerate(texts):
                if i == it.correct[0]:
                    continue
                d = units(t)
                assert (d < 0) == (answer < 0), (name, texts)
                assert abs(d - answer) <= max(abs(answer) / 2, 20), (name, texts)


def test_operands_respect_digit_ranges_and_decimals(variant_items):
    for name, items in variant_items.items():
        _, op, typ, lo, hi = name.split("-")
        lo, hi = int(lo), int(hi)
        for it in items:
            expr = QUESTION.search(it.context.rsplit("Q: ", 1)[1]).group(1)
            tokens = expr.split(" ")
            nums = tokens[::2]
            if typ == "float":
                assert all(FLOAT_RE.fullmatch(n) for n in nums), expr
            in_range = lambda n: lo <= len(n.split(".")[0]) <= hi and not n.startswith("0")  # noqa: E731
            for i, n in enumerate(nums):
                is_dividend = i + 1 < len(nums) and tokens[2 * i + 1] == "/"
                if typ == "int" and is_dividend:
                    # Exact int division: divisor and quotient are in range.
                    divisor = nums[i + 1]
                    assert int(n) % int(divisor) == 0, expr
                    assert in_range(str(int(n) // int(divisor))), expr
                else:
                    assert in_range(n), expr
            n_ops = {"mix2": 2, "mix3": 3}.get(op, 1)
            assert len(nums) == n_ops + 1, expr
            ops = tokens[1::2]
            if op in ("mix2", "mix3"):
                assert set(ops) & {"+", "-"} and set(ops) & {"*", "/"}, expr
                assert all(not (a in "*/" and b in "*/") for a, b in zip(ops, ops[1:])), expr
            else:
                assert ops == [{"add": "+", "sub": "-", "mul": "*", "div": "/"}[op]]
            assert it.meta == {"op": op, "type": typ, "digits": f"{lo}-{hi}"}


def test_deterministic_per_seed():
    a = load_task("calc").items(limit=50)
    b = load_task("calc").items(limit=50)
    assert a == b
    c = load_task("calc").items(limit=50, seed=1)
    assert [i.context for i in c] != [i.context for i in a]
    assert calc.generate(calc.parse_name("calc"), 50, seed=1) == calc.generate(calc.parse_name("calc"), 50, seed=1)


def test_limit_gives_a_prefix():
    full = load_task("calc-mix3").items()
    assert len(full) == 100
    assert load_task("calc-mix3").items(limit=7) == full[:7]
    assert len(load_task("calc-mix3").items(limit=1000)) == 100  # limit never extends


def test_answer_position_varies():
    positions = Counter(it.correct[0] for it in load_task("calc").items())
    assert set(positions) == {0, 1, 2, 3}
    assert min(positions.values()) >= 40, positions


def test_calc_mix_is_balanced_round_robin():
    items = load_task("calc").items()
    assert len(items) == 300
    combos = Counter((it.meta["op"], it.meta["type"], it.meta["digits"]) for it in items[:288])
    assert len(combos) == 36 and set(combos.values()) == {8}
    assert {it.meta["op"] for it in items[:6]} == set(calc.OPS)


def test_partial_names():
    add = load_task("calc-add").items()
    assert len(add) == 100 and {it.meta["op"] for it in add} == {"add"}
    assert {it.meta["type"] for it in add} == {"int", "float"} and len({it.meta["digits"] for it in add}) == 3
    ints = load_task("calc-int").items(limit=30)
    assert {it.meta["type"] for it in ints} == {"int"} and len({it.meta["op"] for it in ints}) == 6
    one = load_task("calc-mul-int-3-4").items()
    assert {(it.meta["op"], it.meta["type"], it.meta["digits"]) for it in one} == {("mul", "int", "3-4")}
    assert load_task("calc-div-float").name == "calc-div-float"


@pytest.mark.parametrize(
    "name, suggestion",
    [("calc-mul-int-3-5", "calc-mul-int-3-4"), ("calc-mult", "calc-mul"), ("calc-add-integer", "calc-add-int")],
)
def test_unknown_variant_suggests(name, suggestion):
    with pytest.raises(TaskError, match=rf"unknown calc variant '{name}'.*did you mean '{suggestion}'"):
        load_task(name)


def test_prompt_has_instruction_and_correct_demos():
    task = load_task("calc")
    prefix = task.prefix()
    assert prefix.startswith(calc.INSTRUCTION + "\n\n")
    assert len(task.fewshot) == 4
    for demo in task.fewshot:
        assert f"Q: {demo['question']}\nA: {demo['answer']}\n\n" in prefix
        expr = QUESTION.fullmatch(demo["question"]).group(1)
        typ = "float" if "." in expr else "int"
        assert demo["answer"] == expected_answer(expr, typ), demo
    it = task.items(limit=1)[0]
    assert it.context == prefix + f"Q: {QUESTION.search(it.context.rsplit('Q: ', 1)[1]).group(0)}\nA:"
    assert task.format == "generated" and task.metric == "acc" and task.data is None
    assert task.source == "builtin:calc"


def test_hash_depends_on_variant_and_seed():
    assert load_task("calc").hash() == load_task("calc").hash()
    assert load_task("calc").hash() != load_task("calc-add").hash()
    from lcprobe.tasks.task import calc_task

    assert calc_task("calc", seed=1).hash() != calc_task("calc").hash()


def test_units_formatting_and_rounding():
    assert calc.format_units(-310, "float") == "-3.10"
    assert calc.format_units(5, "float") == "0.05"
    assert calc.format_units(-7, "int") == "-7"
    assert calc.to_units(Fraction(1, 8), "float") == 13  # 0.125 -> 0.13, half away from zero
    assert calc.to_units(Fraction(-1, 8), "float") == -13


def test_distractors_for_tiny_answers():
    import random

    for answer in (0, 1, 2, -1, 5):
        ds = calc.distractors(random.Random(0), answer)
        assert len(set(ds)) == 3 and answer not in ds
        assert all(calc.plausible(d, answer) for d in ds)
