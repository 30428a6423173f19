"""Readers: turn a data file into a list of item records (plain dicts).

The fields of a record and the input format of each reader: docs/task-readers.md. Every problem a
user can fix raises :class:`TaskError` naming the file and the line or item.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lcprobe.errors import LcprobeError, TaskError

FORMATS_WITH_DATA = ("true-false", "choices")

#: Keys with a structural meaning; never usable as template fields.
RESERVED_FIELDS = frozenset({"truth_answer", "error", "choices", "answer", "meta"})


def reader_names() -> list[str]:
    return sorted(_READERS)


def reader_format(reader: str) -> str | None:
    """The format a reader always produces, or None if the file decides (jsonl)."""
    return _READERS[reader][0]


def reader_fields(reader: str) -> frozenset[str]:
    """Template fields the reader provides on every record beyond id/question."""
    return _READERS[reader][1]


def read_records(reader: str, path: str | Path, format: str) -> list[dict]:
    """Read ``path`` with ``reader`` and check every record against ``format``."""
    if reader not in _READERS:
        raise TaskError(f"unknown reader {reader!r} (known: {', '.join(reader_names())})")
    if format not in FORMATS_WITH_DATA:
        raise TaskError(f"reader {reader!r} cannot produce format {format!r}")
    fixed = reader_format(reader)
    if fixed is not None and fixed != format:
        raise TaskError(f"reader {reader!r} produces {fixed!r} items, but the task's format is {format!r}")
    path = Path(path)
    text = read_text_file(path, "data file", TaskError)
    located = _READERS[reader][2](path, text)
    records: list[dict] = []
    seen: dict[str, str] = {}
    for where, rec in located:
        rec = _check(rec, format, where)
        if rec["id"] in seen:
            raise TaskError(f"{where}: duplicate id {rec['id']!r} (first at {seen[rec['id']]})")
        seen[rec["id"]] = where
        records.append(rec)
    if not records:
        raise TaskError(f"{path}: no items")
    return records


# --- record checks ----------------------------------------------------------


def _check(rec: dict, format: str, where: str) -> dict:
    """Validate and normalise one record (a new dict; the input is not changed)."""
    out = dict(rec)
    if not isinstance(out.get("question"), str):
        raise TaskError(f"{where}: missing or non-string 'question'")
    ident = out.get("id")
    if isinstance(ident, bool) or not isinstance(ident, (str, int)):
        raise TaskError(f"{where}: 'id' must be a string or an integer")
    out["id"] = str(ident)
    meta = out.get("meta", {})
    if not isinstance(meta, dict):
        raise TaskError(f"{where}: 'meta' must be an object")
    out["meta"] = dict(meta)
    if format == "true-false":
        for key in ("truth_answer", "error"):
            out[key] = _answers(out.get(key), key, where)
    else:
        out["choices"], out["answer"] = _choices(out.get("choices"), out.get("answer"), where)
    return out


def _answers(value: Any, key: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise TaskError(f"{where}: {key!r} must be a list of strings")
    return [a.strip() for a in value if a.strip()]


def _choices(choices: Any, answer: Any, where: str) -> tuple[list[str], list[int]]:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise TaskError(f"{where}: 'choices' must be a non-empty list of strings")
    choices = [c.strip() for c in choices]
    if not all(choices):
        raise TaskError(f"{where}: empty string in 'choices'")
    indices = answer if isinstance(answer, list) else [answer]
    if not indices or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise TaskError(f"{where}: 'answer' must be a choice index or a non-empty list of them")
    bad = [i for i in indices if not 0 <= i < len(choices)]
    if bad:
        raise TaskError(f"{where}: answer index {bad[0]} out of range for {len(choices)} choices")
    if len(set(indices)) != len(indices):
        raise TaskError(f"{where}: repeated index in 'answer'")
    return choices, list(indices)


# --- readers ----------------------------------------------------------------

Located = list[tuple[str, dict]]


def read_text_file(path: Path, what: str = "data file", error: type[LcprobeError] = TaskError) -> str:
    """A UTF-8 file's text (a BOM dropped), or ``error`` with a one-line reason."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None


def check_encodable(value: Any, where: str) -> None:
    """Refuse text with an unpaired surrogate: JSON and YAML escapes (\\ud800) make them,
    and no tokenizer can take them."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TaskError(f"{where}: text holds an unpaired surrogate {value[e.start]!r} "
                            "(a broken \\u escape)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_encodable(k, where)
            check_encodable(v, where)
    elif isinstance(value, list):
        for v in value:
            check_encodable(v, where)


def _read_jsonl(path: Path, text: str) -> Located:
    out: Located = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise TaskError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        if "\\u" in line:
            check_encodable(rec, where)
        rec.setdefault("id", len(out))
        if isinstance(rec.get("category"), str):
            meta = rec.get("meta")
            if isinstance(meta, dict):
                rec["meta"] = {"category": rec["category"], **meta}
            elif meta is None:
                rec["meta"] = {"category": rec["category"]}
        out.append((where, rec))
    return out


def _read_reclor(path: Path, text: str) -> Located:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TaskError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise TaskError(f"{path}: expected a JSON list of ReClor items")
    check_encodable(data, str(path))
    out: Located = []
    for i, item in enumerate(data):
        where = f"{path}: item {i}"
        if not isinstance(item, dict):
            raise TaskError(f"{where}: expected an object")
        missing = [k for k in ("context", "question", "answers", "label", "id_string") if k not in item]
        if missing:
            raise TaskError(f"{where}: missing key {missing[0]!r}")
        if not isinstance(item["context"], str):
            raise TaskError(f"{where}: 'context' must be a string")
        rec = {
            "id": item["id_string"],
            "context": item["context"],
            "question": item["question"],
            "choices": item["answers"],
            "answer": item["label"],
        }
        out.append((where, rec))
    return out


def _split(cell: str, sep: str) -> list[str]:
    return [p.strip() for p in cell.split(sep) if p.strip()]


def _csv_rows(path: Path, text: str, delimiter: str, columns: tuple[str, ...]):
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
    header = reader.fieldnames or []
    missing = [c for c in columns if c not in header]
    if missing:
        raise TaskError(f"{path}: missing column {missing[0]!r} (header: {', '.join(header)})")
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row or any(row[c] is None for c in columns):
            raise TaskError(f"{where}: expected {len(header)} fields")
        yield where, row


def _read_truthfulqa(path: Path, text: str) -> Located:
    columns = ("Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source")
    out: Located = []
    for where, row in _csv_rows(path, text, ",", columns):
        best = row["Best Answer"].strip()
        truth = ([best] if best else []) + [a for a in _split(row["Correct Answers"], ";") if a != best]
        out.append(
            (
                where,
                {
                    "id": len(out),
                    "question": row["Question"].strip(),
                    "truth_answer": truth,
                    "error": _split(row["Incorrect Answers"], ";"),
                    "type": row["Type"],
                    "category": row["Category"],
                    "source": row["Source"],
                    "meta": {"type": row["Type"], "category": row["Category"]},
                },
            )
        )
    return out


MASK = "<mask>"


def _read_mlama(path: Path, text: str) -> Located:
    out: Located = []
    for where, row in _csv_rows(path, text, "\t", ("Prompt", "Ans", "Candidate Ans", "Subject")):
        prompt = row["Prompt"]
        if prompt.count(MASK) != 1:
            raise TaskError(f"{where}: Prompt must contain {MASK} exactly once")
        before, after = prompt.split(MASK)
        ans = row["Ans"].strip()
        out.append(
            (
                where,
                {
                    "id": len(out),
                    "question": before.rstrip(),
                    "after": after.rstrip(),
                    "truth_answer": [ans],
                    "error": [c for c in _split(row["Candidate Ans"], ",") if c != ans],
                    "prompt": prompt,
                    "subject": row["Subject"],
                    "meta": {"subject": row["Subject"]},
                },
            )
        )
    return out


#: Choices per item of a pairs table: the answer and this many distractors.
PAIRS_DISTRACTORS = 3


def _read_pairs(path: Path, text: str) -> Located:
    """A two-column table of questions and answers made into multiple choice.

    Each row's distractors are other rows' answers, and the answer's slot among
    the choices, drawn with a generator seeded by the row's question: the items
    depend only on the table, never on the run.
    """
    import random

    rows = list(_csv_rows(path, text, "\t", ("question", "answer")))
    answers = sorted({row["answer"].strip() for _, row in rows if row["answer"].strip()})
    if len(answers) <= PAIRS_DISTRACTORS:
        raise TaskError(f"{path}: needs more than {PAIRS_DISTRACTORS} distinct answers to draw distractors")
    out: Located = []
    for where, row in rows:
        question, answer = row["question"].strip(), row["answer"].strip()
        rng = random.Random(question)
        choices = rng.sample([a for a in answers if a != answer], PAIRS_DISTRACTORS)
        slot = rng.randrange(PAIRS_DISTRACTORS + 1)
        choices.insert(slot, answer)
        out.append((where, {"id": len(out), "question": question, "choices": choices, "answer": slot}))
    return out


_READERS: dict[str, tuple[str | None, frozenset[str], Callable[[Path, str], Located]]] = {
    "jsonl": (None, frozenset(), _read_jsonl),
    "reclor_json": ("choices", frozenset({"context"}), _read_reclor),
    "truthfulqa_csv": ("true-false", frozenset({"type", "category", "source"}), _read_truthfulqa),
    "mlama_tsv": ("true-false", frozenset({"after", "prompt", "subject"}), _read_mlama),
    "pairs_tsv": ("choices", frozenset(), _read_pairs),
}
