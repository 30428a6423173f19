"""Tasks: what to ask a model and which continuations to score.

A task is a YAML file (see ``tasks/*.yaml``) or the generated ``calc`` family.
Prompts follow one public rule::

    prompt  = [instruction + separator]
              + for each demo: question_template(demo) + answer_template(demo) + separator
              + question_template(item)
    choice  = answer_template with {answer} = the choice

Templates are ``str.format`` templates over the item's fields (``question``,
``id`` and whatever the reader provides, e.g. ``context``); the answer template
also gets ``answer``. Demos are the YAML ``fewshot`` list followed by the first
``fewshot_from_data`` data records that have a true answer (shown with their
best true answer and never scored).

``true-false`` records whose true or false answer list is empty cannot be
scored; :meth:`Task.items` leaves them out and :attr:`Task.skipped` /
:meth:`Task.skipped_ids` report them (demos excluded).

Data location, first match wins: the ``data`` argument (must exist), the
YAML's ``data`` (relative to the YAML file), ``$LCPROBE_DATA/<basename>``,
``~/.cache/lcprobe/data/<basename>``. Built-in YAML tasks live in
``<repo>/tasks`` unless ``$LCPROBE_TASKS`` names another directory.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import os
import random
import re
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lcprobe.tasks import calc

from lcprobe.tasks import readers
from lcprobe.errors import TaskError
from lcprobe.files.resources import cache_dir, shipped_dir

FORMATS = ("true-false", "choices", "generated")
METRICS = ("acc", "mc1", "mc2", "mc3")
DEFAULT_SEPARATOR = "\n\n"

_REQUIRED = ("name", "format", "metric", "question_template", "answer_template")
_OPTIONAL = ("description", "data", "instruction", "fewshot", "separator", "reader", "fewshot_from_data")

#: Part of every hash, so a change to how prompts are built can invalidate them.
_HASH_SCHEMA = 1


@dataclass(frozen=True)
class Item:
    id: str
    context: str  # the full prompt: prefix + question_template(item)
    choices: tuple[str, ...]  # continuations, answer_template applied
    correct: tuple[int, ...]  # indices of true choices; the first is the best
    meta: dict


@dataclass(frozen=True)
class TaskInfo:
    """What ``lcprobe tasks`` lists; never fails on a missing data file."""

    name: str
    family: str
    description: str
    format: str
    metric: str
    source: str
    data: str | None  # the resolved data path, or None if generated / not found
    n_items: int | None  # None when the data file is missing


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    format: str
    metric: str
    instruction: str
    fewshot: tuple[dict, ...]
    question_template: str
    answer_template: str
    separator: str
    data: str | None
    source: str
    reader: str = "jsonl"
    fewshot_from_data: int = 0
    extra: dict = field(default_factory=dict)

    # --- prompts -------------------------------------------------------------

    def prefix(self) -> str:
        """Instruction and demonstrations: the part every item's prompt shares."""
        parts = [self.instruction + self.separator] if self.instruction else []
        for where, demo in self._demos():
            parts.append(self._render("question_template", demo, where))
            parts.append(self._render("answer_template", demo, where))
            parts.append(self.separator)
        return "".join(parts)

    def items(self, limit: int | None = None, seed: int | None = None) -> list[Item]:
        """The scored items.

        Data tasks: file order; with ``seed``, a seeded random subset (kept in
        file order) of ``limit`` items. Generated tasks: ``seed`` replaces the
        task's seed; ``limit`` truncates (never extends) the ``n`` items.
        """
        if limit is not None and limit < 0:
            raise TaskError(f"limit must be >= 0, got {limit}")
        if self.format == "generated":
            return self._generated_items(limit, seed)
        prefix = self.prefix()
        scored = self._scored_records()
        if seed is not None:
            order = list(range(len(scored)))
            random.Random(seed).shuffle(order)
            scored = [scored[i] for i in sorted(order[:limit])]
        elif limit is not None:
            scored = scored[:limit]
        return [self._item(prefix, rec) for rec in scored]

    def fewshot_ids(self) -> list[str]:
        """Ids of the data records used as demonstrations (not scored)."""
        return [rec["id"] for rec in self._data_demo_records()]

    @property
    def skipped(self) -> int:
        """How many data records cannot be scored (no true or no false answer)."""
        return len(self.skipped_ids())

    def skipped_ids(self) -> list[str]:
        if self.format != "true-false":
            return []
        demo = set(self.fewshot_ids())
        return [r["id"] for r in self._records() if r["id"] not in demo and not _scorable(r)]

    def hash(self) -> str:
        """sha256 over the definition and the data bytes.

        Paths (``data``, ``source``) and ``description`` are left out so the
        same task gives the same hash on any machine; the data file's bytes
        and, for calc, the generator version stand in for them.
        """
        definition = asdict(self)
        for key in ("data", "source", "description"):
            definition.pop(key)
        definition["schema"] = _HASH_SCHEMA
        h = hashlib.sha256(json.dumps(definition, sort_keys=True, ensure_ascii=False).encode())
        if self.data is not None:
            h.update(b"\0")
            h.update(_data_path(self).read_bytes())
        return h.hexdigest()

    # --- internals -----------------------------------------------------------

    def _records(self) -> tuple[dict, ...]:
        path = _data_path(self)
        st = path.stat()
        return _cached_records(self.reader, str(path), self.format, st.st_mtime_ns, st.st_size)

    def _data_demo_records(self) -> list[dict]:
        if self.data is None or self.fewshot_from_data == 0:
            return []
        demos = [r for r in self._records() if _best_answer(r) is not None][: self.fewshot_from_data]
        if len(demos) < self.fewshot_from_data:
            raise TaskError(
                f"{self.source}: fewshot_from_data is {self.fewshot_from_data} but the data has "
                f"only {len(demos)} records with a true answer"
            )
        return demos

    def _demos(self) -> list[tuple[str, dict]]:
        out = [(f"{self.source}: fewshot[{i}]", d) for i, d in enumerate(self.fewshot)]
        for rec in self._data_demo_records():
            out.append((f"{self.source}: demo item {rec['id']}", {**rec, "answer": _best_answer(rec)}))
        return out

    def _scored_records(self) -> list[dict]:
        demo = set(self.fewshot_ids())
        scored = [r for r in self._records() if r["id"] not in demo and _scorable(r)]
        if not scored:
            raise TaskError(f"{self.source}: no items left to score (data {self.data})")
        return scored

    def _item(self, prefix: str, rec: dict) -> Item:
        where = f"{self.source}: item {rec['id']}"
        if self.format == "true-false":
            answers = rec["truth_answer"] + rec["error"]
            correct = tuple(range(len(rec["truth_answer"])))
        else:
            answers, correct = rec["choices"], tuple(rec["answer"])
        choices = tuple(self._render("answer_template", {**rec, "answer": a}, where) for a in answers)
        context = prefix + self._render("question_template", rec, where)
        return Item(id=rec["id"], context=context, choices=choices, correct=correct, meta=dict(rec["meta"]))

    def _generated_items(self, limit: int | None, seed: int | None) -> list[Item]:
        spec = calc.parse_name(self.extra["variant"])
        n = self.extra["n"] if limit is None else min(limit, self.extra["n"])
        prefix = self.prefix()
        items = []
        for i, p in enumerate(calc.generate(spec, n, self.extra["seed"] if seed is None else seed)):
            rec = {"id": str(i), "question": p.question}
            where = f"{self.source}: item {i}"
            items.append(
                Item(
                    id=str(i),
                    context=prefix + self._render("question_template", rec, where),
                    choices=tuple(self._render("answer_template", {**rec, "answer": c}, where) for c in p.choices),
                    correct=(p.correct,),
                    meta=dict(p.meta),
                )
            )
        return items

    def _render(self, key: str, fields: dict, where: str) -> str:
        template = getattr(self, key)
        for name in _placeholders(template, key, self.source):
            if name not in fields or (name in readers.RESERVED_FIELDS and name != "answer"):
                raise TaskError(f"{where}: {key} uses {{{name}}}, which this item does not have")
            if name == "answer" and key == "question_template":
                raise TaskError(f"{self.source}: question_template must not use {{answer}}")
        return template.format_map(fields)


def _scorable(rec: dict) -> bool:
    return "choices" in rec or bool(rec["truth_answer"] and rec["error"])


def _best_answer(rec: dict) -> str | None:
    if "choices" in rec:
        return rec["choices"][rec["answer"][0]]
    return rec["truth_answer"][0] if rec["truth_answer"] else None


def _data_path(task: Task) -> Path:
    path = Path(task.data or "")
    if task.data is None or not path.is_file():
        raise TaskError(_missing_data_message(task.name, task.data or "?"))
    return path


@functools.lru_cache(maxsize=32)
def _cached_records(reader: str, path: str, format: str, mtime_ns: int, size: int) -> tuple[dict, ...]:
    # mtime and size are part of the key so an edited file is read again.
    return tuple(readers.read_records(reader, path, format))


_MAX_PAD = 1000


@functools.lru_cache(maxsize=64)
def _placeholders(template: str, key: str, source: str) -> tuple[str, ...]:
    """Field names used by a template; TaskError for anything but plain names."""
    names = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise TaskError(f"{source}: {key} is not a valid template ({e})") from None
    for _, name, spec, _ in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            shown = "{" + name + "}"
            raise TaskError(f"{source}: {key} placeholder {shown} must be a field name such as {{question}}")
        if spec and "{" in spec:
            raise TaskError(f"{source}: {key} placeholder {{{name}}} has a nested field in its format spec")
        # "{question:>99999999}" would build a 100 MB prompt
        if spec and max(int(n) for n in re.findall(r"\d+", spec) or ["0"]) > _MAX_PAD:
            raise TaskError(f"{source}: {key} placeholder {{{name}:{spec}}} pads past {_MAX_PAD} characters")
        names.append(name)
    return tuple(names)


# --- loading ----------------------------------------------------------------


def tasks_dir() -> Path:
    """Where built-in task YAMLs live: ``$LCPROBE_TASKS``, else the shipped ``tasks/``."""
    env = os.environ.get("LCPROBE_TASKS")
    return Path(env).expanduser() if env else shipped_dir("tasks")


def data_dirs() -> list[Path]:
    """Fallback data directories, in order (``lcprobe data pull`` fills the last)."""
    dirs = []
    if os.environ.get("LCPROBE_DATA"):
        dirs.append(Path(os.environ["LCPROBE_DATA"]).expanduser())
    dirs.append(cache_dir() / "data")
    return dirs


def _yaml_builtins() -> dict[str, Path]:
    d = tasks_dir()
    if not d.is_dir():
        return {}
    return {p.stem: p for p in sorted(d.glob("*.yaml"))}


def builtin_names() -> list[str]:
    """Built-in task names: ``calc``, ``calc-<op>`` and the YAML tasks."""
    return ["calc", *(f"calc-{op}" for op in calc.OPS), *_yaml_builtins()]


def load_task(spec: str, data: str | None = None) -> Task:
    """A built-in name (``calc``, ``calc-mul-int-3-4``, ``mps-cal``) or a YAML path.

    ``data`` overrides the task's data file. Raises :class:`TaskError` for
    anything wrong with the task or its data, including a missing data file.
    """
    task = _load(spec, data)
    _validate(task)
    return task


def builtin_tasks() -> list[TaskInfo]:
    """The built-in tasks for listing; data files are optional here."""
    infos = []
    for name in builtin_names():
        task = _load(name, None, require_data=False)
        n: int | None
        if task.format == "generated":
            n = task.extra["n"]
        elif task.data is None:
            n = None
        else:
            n = len(task.items())
        family = name.split("-", 1)[0]
        infos.append(TaskInfo(name, family, task.description, task.format, task.metric, task.source, task.data, n))
    return infos


def _load(spec: str, data: str | None, require_data: bool = True) -> Task:
    if spec.endswith((".yaml", ".yml")) or "/" in spec or os.sep in spec:
        return _load_yaml(Path(spec), data, require_data)
    if spec == "calc" or spec.startswith("calc-"):
        if data is not None:
            raise TaskError(f"task {spec!r} is generated; it takes no data file")
        return calc_task(spec)
    builtins = _yaml_builtins()
    if spec in builtins:
        return _load_yaml(builtins[spec], data, require_data)
    if Path(spec).is_file():  # a task file named without a YAML suffix
        return _load_yaml(Path(spec), data, require_data)
    known = builtin_names()
    close = difflib.get_close_matches(spec, known + calc.all_names(), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise TaskError(f"unknown task {spec!r} (not a built-in name or a YAML file){hint} Known: {', '.join(known)}")


def calc_task(name: str = "calc", n: int | None = None, seed: int = calc.DEFAULT_SEED) -> Task:
    """A calc task by name; ``n`` defaults to 300 for ``calc``, 100 for variants."""
    spec = calc.parse_name(name)
    n = spec.default_n() if n is None else n
    if n < 1:
        raise TaskError(f"calc task needs n >= 1, got {n}")
    return Task(
        name=name,
        description=f"Generated arithmetic ({', '.join(spec.ops)}; {', '.join(spec.types)}; "
        f"digits {', '.join(spec.digits)}), 4 choices",
        format="generated",
        metric="acc",
        instruction=calc.INSTRUCTION,
        fewshot=tuple(dict(d) for d in calc.DEMOS),
        question_template="Q: {question}\nA:",
        answer_template=" {answer}",
        separator=DEFAULT_SEPARATOR,
        data=None,
        source=f"builtin:{name}",
        reader="calc",
        fewshot_from_data=0,
        extra={
            "variant": name,
            "n": n,
            "seed": seed,
            "ops": list(spec.ops),
            "types": list(spec.types),
            "digits": list(spec.digits),
            "generator_version": calc.GENERATOR_VERSION,
        },
    )


def _load_yaml(path: Path, data: str | None, require_data: bool) -> Task:
    src = str(path.resolve())
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TaskError(f"{path}: task file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TaskError(f"{path}: cannot read task file ({e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise TaskError(f"{path}{at}: invalid YAML ({problem})") from None
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: a task file must be a mapping of keys such as name, format, metric")
    readers.check_encodable(raw, str(path))

    for key in raw:
        if key not in _REQUIRED + _OPTIONAL:
            close = difflib.get_close_matches(str(key), _REQUIRED + _OPTIONAL, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TaskError(f"{path}: unknown key {key!r}{hint}")
    for key in _REQUIRED:
        if key not in raw:
            raise TaskError(f"{path}: missing required key {key!r}")
    if "data" not in raw and data is None:
        raise TaskError(f"{path}: missing required key 'data' (or pass --data)")

    def text(key: str, default: str | None = None) -> str:
        value = raw.get(key, default)
        if not isinstance(value, str):
            raise TaskError(f"{path}: key {key!r} must be a string, got {type(value).__name__}")
        return value

    fmt = text("format")
    if fmt not in ("true-false", "choices"):
        extra = " ('generated' is only for the built-in calc tasks)" if fmt == "generated" else ""
        raise TaskError(f"{path}: unknown format {fmt!r}; use true-false or choices{extra}")
    metric = text("metric")
    if metric not in METRICS:
        raise TaskError(f"{path}: unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    reader = text("reader", "jsonl")
    if reader not in readers.reader_names():
        raise TaskError(f"{path}: unknown reader {reader!r}; use one of {', '.join(readers.reader_names())}")
    fixed = readers.reader_format(reader)
    if fixed is not None and fixed != fmt:
        raise TaskError(f"{path}: reader {reader!r} produces {fixed!r} items but format is {fmt!r}")
    k = raw.get("fewshot_from_data", 0)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise TaskError(f"{path}: key 'fewshot_from_data' must be a non-negative integer")

    fewshot = raw.get("fewshot") or []
    if not isinstance(fewshot, list):
        raise TaskError(f"{path}: key 'fewshot' must be a list of {{question, answer}} mappings")
    for i, demo in enumerate(fewshot):
        if not isinstance(demo, dict) or not all(isinstance(demo.get(f), str) for f in ("question", "answer")):
            raise TaskError(f"{path}: fewshot[{i}] must be a mapping with string 'question' and 'answer'")

    task = Task(
        name=text("name"),
        description=text("description", ""),
        format=fmt,
        metric=metric,
        instruction=text("instruction", ""),
        fewshot=tuple(fewshot),
        question_template=text("question_template"),
        answer_template=text("answer_template"),
        separator=text("separator", DEFAULT_SEPARATOR),
        data=None,
        source=src,
        reader=reader,
        fewshot_from_data=k,
        extra={},
    )
    if not task.name:
        raise TaskError(f"{path}: key 'name' must not be empty")
    _check_templates(task, fields=None)
    resolved = _resolve_data(path, raw.get("data"), data, task.name, require_data)
    return _replace(task, data=str(resolved) if resolved else None)


def _replace(task: Task, **changes: Any) -> Task:
    return Task(**{**{f: getattr(task, f) for f in task.__dataclass_fields__}, **changes})


def _resolve_data(yaml_path: Path, declared: Any, override: str | None, name: str, require: bool) -> Path | None:
    if override is not None:
        p = Path(override).expanduser()
        if not p.is_file():
            raise TaskError(f"data file {override} not found (given for task {name!r})")
        return p.resolve()
    if not isinstance(declared, str) or not declared:
        raise TaskError(f"{yaml_path}: key 'data' must be a non-empty string")
    declared_path = Path(declared).expanduser()
    candidates = [declared_path if declared_path.is_absolute() else yaml_path.resolve().parent / declared_path]
    candidates += [d / declared_path.name for d in data_dirs()]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    if require:
        raise TaskError(_missing_data_message(name, declared_path.name, candidates))
    return None


def _missing_data_message(name: str, basename: str, tried: list[Path] | None = None) -> str:
    where = f" (looked in {', '.join(str(c.parent) for c in tried)})" if tried else ""
    return (
        f"task {name!r}: data file {basename} not found{where}; "
        f"run `lcprobe data pull` or pass --data PATH"
    )


def _check_templates(task: Task, fields: set[str] | None) -> None:
    """Load-time template check.

    With ``fields`` None only what is known without the data is checked: the
    format's fields plus the fixed fields of a fixed-format reader. The jsonl
    reader's extra fields are only known from the data, so :func:`_validate`
    calls this again with them.
    """
    base = {"question", "id"}
    if fields is None:
        if readers.reader_format(task.reader) is None:
            fields_known: set[str] | None = None
        else:
            fields_known = base | readers.reader_fields(task.reader)
    else:
        fields_known = base | (fields - readers.RESERVED_FIELDS)
    q = _placeholders(task.question_template, "question_template", task.source)
    a = _placeholders(task.answer_template, "answer_template", task.source)
    if "answer" not in a:
        raise TaskError(f"{task.source}: answer_template must use {{answer}} (e.g. ' {{answer}}')")
    if "answer" in q:
        raise TaskError(f"{task.source}: question_template must not use {{answer}}")
    if fields_known is None:
        return
    for key, names in (("question_template", q), ("answer_template", a)):
        for n in names:
            if n != "answer" and n not in fields_known:
                raise TaskError(
                    f"{task.source}: {key} uses unknown placeholder {{{n}}}; "
                    f"fields: {', '.join(sorted(fields_known | {'answer'}))}"
                )


def _validate(task: Task) -> None:
    """Checks that need the data: every record's template fields, the demos."""
    if task.format == "generated":
        task.items(limit=1)
        return
    records = task._records()
    union: set[str] = set()
    for r in records:
        union |= set(r)
    _check_templates(task, union)
    needed = set(_placeholders(task.question_template, "question_template", task.source))
    needed |= set(_placeholders(task.answer_template, "answer_template", task.source)) - {"answer"}
    for r in records:
        missing = sorted(needed - set(r))
        if missing:
            raise TaskError(f"{task.source}: item {r['id']} has no field {missing[0]!r} used by a template")
    task.prefix()
    task._scored_records()
