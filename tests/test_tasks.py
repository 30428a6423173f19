"""Task loading, prompt construction and every user mistake -> TaskError."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from lcprobe.errors import TaskError
from lcprobe.tasks.task import Item, Task, builtin_names, builtin_tasks, load_task, tasks_dir
from paths import paper_data

FIX = Path(__file__).parent / "fixtures" / "tasks"
REPO_TASKS = Path(__file__).resolve().parent.parent / "tasks"
REAL_DATA = paper_data()
# skipped without the data, failed under `make test` (see tests/paths.py)
needs_real_data = pytest.mark.usefixtures("paper_data_required")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    # No test may find data through the developer's own cache or env.
    monkeypatch.delenv("LCPROBE_DATA", raising=False)
    monkeypatch.delenv("LCPROBE_TASKS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def copy_fixture(tmp_path: Path, yaml_name: str, data_name: str, **changes) -> Path:
    """Copy a fixture task and its data into tmp_path, applying YAML changes
    (a value of None deletes the key)."""
    shutil.copy(FIX / data_name, tmp_path / data_name)
    raw = yaml.safe_load((FIX / yaml_name).read_text())
    for k, v in changes.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    out = tmp_path / yaml_name
    out.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return out


# --- prompt rule --------------------------------------------------------------

TF_PREFIX = (
    "Answer with a colour.\n\n"
    "Q: What colour is grass?\nA: green\n\n"  # YAML demo
    "Q: What colour is the sky?\nA: blue\n\n"  # first data record, best true answer
)


def test_true_false_prompt_is_exactly_the_public_rule():
    task = load_task(str(FIX / "tf.yaml"))
    assert task.prefix() == TF_PREFIX
    items = {it.id: it for it in task.items()}
    assert list(items) == ["1", "3"]
    snow = items["1"]
    assert snow.context == TF_PREFIX + "Q: What colour is snow?\nA:"
    assert snow.choices == (" white", " black", " purple")  # true first, then false, file order
    assert snow.correct == (0,)
    assert snow.meta == {"category": "nature"}
    banana = items["3"]
    # Answers are stripped (template supplies the space) and empty ones dropped.
    assert banana.choices == (" yellow", " blue")


def test_multiple_true_answers_keep_order_best_first(tmp_path):
    y = copy_fixture(tmp_path, "tf.yaml", "tf.jsonl", fewshot_from_data=0)
    sky = load_task(str(y)).items()[0]
    assert sky.id == "0"
    assert sky.choices == (" blue", " azure", " red")
    assert sky.correct == (0, 1)


def test_choices_format_with_passage_field_and_empty_instruction():
    task = load_task(str(FIX / "choices.yaml"))
    assert task.prefix() == ""  # empty instruction: no instruction+separator at all
    a1, a2, seven = task.items()
    assert a1.context == "P: Tom has two cats.\nQ: How many cats does Tom have?\nA:"
    assert a1.choices == (" one", " two", " three") and a1.correct == (1,)
    assert a2.correct == (2, 1)  # list answers keep their order: first is best
    assert seven.id == "7"


def test_skipped_items_are_counted_and_reported():
    task = load_task(str(FIX / "tf.yaml"))
    assert task.skipped == 1
    assert task.skipped_ids() == ["2"]
    assert "2" not in [it.id for it in task.items()]


def test_fewshot_from_data_excluded_from_scoring():
    task = load_task(str(FIX / "tf.yaml"))
    assert task.fewshot_ids() == ["0"]
    ids = [it.id for it in task.items()]
    assert "0" not in ids
    for it in task.items():
        assert "What colour is the sky?\nA: blue" in it.context


def test_items_limit_and_seed():
    task = load_task(str(FIX / "choices.yaml"))
    assert [it.id for it in task.items(limit=2)] == ["a1", "a2"]
    assert task.items(limit=0) == []
    a = [it.id for it in task.items(limit=2, seed=3)]
    assert a == [it.id for it in task.items(limit=2, seed=3)]
    picks = {tuple(it.id for it in task.items(limit=1, seed=s)) for s in range(20)}
    assert len(picks) > 1  # the seed really picks different subsets


def test_items_are_json_serialisable():
    for it in load_task(str(FIX / "tf.yaml")).items():
        assert isinstance(it, Item)
        json.dumps({"id": it.id, "context": it.context, "choices": it.choices, "meta": it.meta})


# --- hash ---------------------------------------------------------------------


def test_hash_stable_and_location_independent(tmp_path):
    h = load_task(str(FIX / "tf.yaml")).hash()
    assert len(h) == 64 and h == load_task(str(FIX / "tf.yaml")).hash()
    moved = copy_fixture(tmp_path, "tf.yaml", "tf.jsonl")
    assert load_task(str(moved)).hash() == h


def test_hash_changes_with_data_and_definition(tmp_path):
    y = copy_fixture(tmp_path, "tf.yaml", "tf.jsonl")
    h = load_task(str(y)).hash()
    with open(tmp_path / "tf.jsonl", "a") as f:
        f.write('{"question": "q", "truth_answer": ["a"], "error": ["b"]}\n')
    assert load_task(str(y)).hash() != h
    y2 = copy_fixture(tmp_path, "tf.yaml", "tf.jsonl", separator="\n")
    assert load_task(str(y2)).hash() != h


# --- data location ------------------------------------------------------------


def test_missing_data_says_how_to_get_it(tmp_path):
    y = tmp_path / "t.yaml"
    y.write_text((FIX / "tf.yaml").read_text())  # data tf.jsonl not copied
    with pytest.raises(TaskError, match=r"tf\.jsonl.*lcprobe data pull") as e:
        load_task(str(y))
    assert "\n" not in str(e.value)


def test_data_found_via_env_then_cache(tmp_path, monkeypatch):
    y = tmp_path / "t.yaml"
    y.write_text((FIX / "tf.yaml").read_text())
    cache = tmp_path / "home" / ".cache" / "lcprobe" / "data"
    cache.mkdir(parents=True)
    shutil.copy(FIX / "tf.jsonl", cache / "tf.jsonl")
    assert load_task(str(y)).data == str(cache / "tf.jsonl")
    env = tmp_path / "envdata"
    env.mkdir()
    shutil.copy(FIX / "tf.jsonl", env / "tf.jsonl")
    monkeypatch.setenv("LCPROBE_DATA", str(env))
    assert load_task(str(y)).data == str(env / "tf.jsonl")
    # The YAML's own relative path wins over both.
    shutil.copy(FIX / "tf.jsonl", tmp_path / "tf.jsonl")
    assert load_task(str(y)).data == str(tmp_path / "tf.jsonl")


def test_data_argument_overrides_yaml(tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text('{"question": "Q1", "truth_answer": ["a"], "error": ["b"]}\n' * 3)
    task = load_task(str(FIX / "tf.yaml"), data=str(other))
    assert task.data == str(other)
    assert [it.id for it in task.items()] == ["1", "2"]
    with pytest.raises(TaskError, match="nope.jsonl"):
        load_task(str(FIX / "tf.yaml"), data=str(tmp_path / "nope.jsonl"))


# --- user mistakes ------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"metric": None}, r"missing required key 'metric'"),
        ({"question_template": None}, r"missing required key 'question_template'"),
        ({"format": "multiple"}, r"unknown format 'multiple'"),
        ({"format": "generated"}, r"only for the built-in calc"),
        ({"metric": "f1"}, r"unknown metric 'f1'"),
        ({"reader": "parquet"}, r"unknown reader 'parquet'"),
        ({"reader": "reclor_json"}, r"reader 'reclor_json' produces 'choices'"),
        ({"separater": "\n"}, r"unknown key 'separater'; did you mean 'separator'"),
        ({"separator": 3}, r"'separator' must be a string"),
        ({"fewshot_from_data": -1}, r"fewshot_from_data"),
        ({"fewshot_from_data": 50}, r"fewshot_from_data is 50"),
        ({"fewshot": [{"question": "q"}]}, r"fewshot\[0\]"),
        ({"question_template": "Q: {questoin}\nA:"}, r"unknown placeholder \{questoin\}"),
        ({"answer_template": " {answer} {context}"}, r"unknown placeholder \{context\}"),
        ({"answer_template": " {ans}"}, r"must use \{answer\}"),
        ({"question_template": "Q: {question} {answer}"}, r"must not use \{answer\}"),
        ({"question_template": "Q: {}"}, r"must be a field name"),
        ({"question_template": "Q: {question"}, r"not a valid template"),
    ],
)
def test_yaml_mistakes_raise_task_error_naming_the_file(tmp_path, changes, pattern):
    y = copy_fixture(tmp_path, "tf.yaml", "tf.jsonl", **changes)
    with pytest.raises(TaskError, match=pattern) as e:
        load_task(str(y))
    assert "tf.yaml" in str(e.value)
    assert "\n" not in str(e.value)


def test_placeholder_missing_from_yaml_demo(tmp_path):
    y = copy_fixture(tmp_path, "choices.yaml", "choices.jsonl", fewshot=[{"question": "q", "answer": "a"}])
    with pytest.raises(TaskError, match=r"fewshot\[0\].*\{context\}"):
        load_task(str(y))


def test_placeholder_missing_from_one_record(tmp_path):
    y = copy_fixture(tmp_path, "choices.yaml", "choices.jsonl")
    with open(tmp_path / "choices.jsonl", "a") as f:
        f.write('{"id": "nocontext", "question": "q", "choices": ["a", "b"], "answer": 0}\n')
    with pytest.raises(TaskError, match=r"item nocontext has no field .context."):
        load_task(str(y))


def test_invalid_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nformat: [unclosed\n")
    with pytest.raises(TaskError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_task(str(bad))
    bad.write_text("- just\n- a list\n")
    with pytest.raises(TaskError, match="must be a mapping"):
        load_task(str(bad))
    with pytest.raises(TaskError, match="not found"):
        load_task(str(tmp_path / "absent.yaml"))


@pytest.mark.parametrize(
    "line, pattern",
    [
        ('{"question": "q", "truth_answer": ["a"], "error": ["b"]', r"tf\.jsonl:6: malformed JSON"),
        ('["q"]', r"tf\.jsonl:6: expected a JSON object"),
        ('{"question": "q", "truth_answer": "a", "error": ["b"]}', r"tf\.jsonl:6: 'truth_answer' must be a list"),
        ('{"truth_answer": ["a"], "error": ["b"]}', r"tf\.jsonl:6: missing or non-string 'question'"),
        ('{"id": "1", "question": "q", "truth_answer": ["a"], "error": ["b"]}', r"tf\.jsonl:6: duplicate id '1'"),
    ],
)
def test_bad_data_lines_name_file_and_line(tmp_path, line, pattern):
    y = copy_fixture(tmp_path, "tf.yaml", "tf.jsonl")
    with open(tmp_path / "tf.jsonl", "a") as f:
        f.write(line + "\n")  # the fixture has 5 lines (one blank), so this is line 6
    with pytest.raises(TaskError, match=pattern):
        load_task(str(y))


@pytest.mark.parametrize(
    "record, pattern",
    [
        ({"question": "q", "choices": ["a", "b"], "answer": 2}, "out of range"),
        ({"question": "q", "choices": ["a", "b"], "answer": True}, "choice index"),
        ({"question": "q", "choices": ["a", " "], "answer": 0}, "empty string"),
        ({"question": "q", "choices": [], "answer": 0}, "non-empty list"),
    ],
)
def test_bad_choices_records(tmp_path, record, pattern):
    y = copy_fixture(tmp_path, "choices.yaml", "choices.jsonl")
    with open(tmp_path / "choices.jsonl", "a") as f:
        f.write(json.dumps({"id": "x", "context": "c", **record}) + "\n")
    with pytest.raises(TaskError, match=rf"choices\.jsonl:4: .*{pattern}"):
        load_task(str(y))


# --- built-ins ----------------------------------------------------------------


def test_unknown_builtin_suggests_a_name():
    with pytest.raises(TaskError, match=r"did you mean 'mps-cal'"):
        load_task("mps-call")
    with pytest.raises(TaskError, match=r"did you mean 'truthfulqa-mc'"):
        load_task("truthfulqa")


def test_builtin_yaml_names_match_file_names():
    assert tasks_dir() == REPO_TASKS
    for path in REPO_TASKS.glob("*.yaml"):
        assert yaml.safe_load(path.read_text())["name"] == path.stem
    expected = {"mps-cal", "xmps-cal-zh", "xmps-cal-fr", "xmps-cal-es", "xmps-cal-th", "reclor", "truthfulqa-mc", "lama"}
    assert expected <= set(builtin_names())
    assert "calc" in builtin_names()


def test_builtin_tasks_list_without_data():
    infos = {i.name: i for i in builtin_tasks()}
    assert infos["mps-cal"].n_items is None and infos["mps-cal"].data is None
    assert infos["mps-cal"].metric == "mc1" and infos["mps-cal"].family == "mps"
    assert infos["reclor"].metric == "acc" and infos["reclor"].format == "choices"
    assert infos["calc"].n_items == 300 and infos["calc"].format == "generated"
    with pytest.raises(TaskError, match="lcprobe data pull"):
        load_task("reclor")


def test_lcprobe_tasks_env_overrides_tasks_dir(tmp_path, monkeypatch):
    shutil.copy(FIX / "choices.yaml", tmp_path / "mine.yaml")
    shutil.copy(FIX / "choices.jsonl", tmp_path / "choices.jsonl")
    monkeypatch.setenv("LCPROBE_TASKS", str(tmp_path))
    assert "mine" in builtin_names() and "mps-cal" not in builtin_names()
    assert load_task("mine").name == "tiny-choices"


def test_generated_task_rejects_data_argument():
    with pytest.raises(TaskError, match="generated"):
        load_task("calc", data="x.jsonl")


@needs_real_data
def test_builtin_tasks_with_real_data(monkeypatch):
    monkeypatch.setenv("LCPROBE_DATA", str(REAL_DATA))
    infos = {i.name: i for i in builtin_tasks()}
    assert infos["mps-cal"].n_items == 712 - 4
    assert infos["xmps-cal-zh"].n_items == 701 - 4
    assert infos["reclor"].n_items == 500 - 4
    assert infos["truthfulqa-mc"].n_items == 817 - 4
    lama = load_task("lama")
    assert lama.skipped == 34  # rows whose only candidate is the answer
    assert len(lama.items()) == 3070 - 4 - 34
    for name in infos:
        task = load_task(name)
        assert isinstance(task, Task) and len(task.hash()) == 64
        first = task.items(limit=1)[0]
        assert first.id not in task.fewshot_ids()
        assert first.context.startswith(task.prefix())
        assert first.correct and max(first.correct) < len(first.choices)


@needs_real_data
def test_reclor_prompt_uses_passage(monkeypatch):
    monkeypatch.setenv("LCPROBE_DATA", str(REAL_DATA))
    task = load_task("reclor")
    assert task.fewshot_ids() == ["val_0", "val_1", "val_2", "val_3"]
    it = task.items(limit=1)[0]
    assert it.id == "val_4"
    assert "P: In a business whose owners and employees all belong to one family" in it.context
    assert it.context.endswith("\nA:") and "\nQ: " in it.context.rsplit("P: ", 1)[1]
    assert len(it.choices) == 4 and len(it.correct) == 1


@needs_real_data
def test_lama_cloze_rendering(monkeypatch):
    monkeypatch.setenv("LCPROBE_DATA", str(REAL_DATA))
    task = load_task("lama")
    assert "\nMichelangelo died in Rome.\n" in task.prefix()
    it = task.items(limit=1)[0]
    assert it.context.endswith("\nThe official language of French Polynesia is")
    assert it.choices[0] == " French." and it.correct == (0,)
