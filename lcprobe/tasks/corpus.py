"""Text for the residual-stream analyses: documents, then windows of token ids.

Two sources of documents:

- a plain text file (``--text``), split into documents at blank lines;
- the default corpus: the questions and true answers of the probing data
  (TruthfulQA question + best answer, GSM8K question + true solution with
  its ``<<...>>`` calculator marks removed, ReClor passage + question + the
  correct answer), interleaved one document from each source in turn so that
  any ``--max-tokens`` cut covers all three. The files are looked up like
  the tasks' data (``$LCPROBE_DATA``, then ``~/.cache/lcprobe/data``).

Documents are tokenized one at a time (no special tokens), each followed by a
blank line, and the token stream is cut into windows of ``window`` tokens.
Each window starts from an empty KV cache, so a window gets the model's BOS
token in front when the model adds one (Gemma's residual stream is far off
its training distribution without it). Windows ignore document boundaries:
the analyses are averages over tokens, and long windows keep every token's
context realistic.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

from lcprobe.errors import LcprobeError
from lcprobe.tasks.readers import read_records, read_text_file

#: The probing data files the default corpus is made of.
DEFAULT_FILES = ("TruthfulQA.csv", "gsm8k_cal_mc.json", "reclor_val.json")

_CALC_MARK = re.compile(r"<<[^>]*>>")


def find_data_dir() -> Path:
    """The first data directory holding all of :data:`DEFAULT_FILES`."""
    from lcprobe.tasks.task import data_dirs

    dirs = data_dirs()
    for d in dirs:
        if all((d / name).is_file() for name in DEFAULT_FILES):
            return d
    looked = ", ".join(str(d) for d in dirs)
    raise LcprobeError(
        f"no --text given and the default corpus ({', '.join(DEFAULT_FILES)}) was not found in "
        f"{looked}; set $LCPROBE_DATA to the directory holding the paper's data or pass --text FILE"
    )


def default_documents(data_dir: str | Path | None = None) -> list[str]:
    """Questions and true answers of TruthfulQA, GSM8K and ReClor, interleaved."""
    d = Path(data_dir) if data_dir is not None else find_data_dir()
    truthful = [f"Q: {r['question']}\nA: {r['truth_answer'][0]}"
                for r in read_records("truthfulqa_csv", d / "TruthfulQA.csv", "true-false")
                if r["truth_answer"]]
    gsm8k = [f"{r['question']}\n{_CALC_MARK.sub('', r['truth_answer'][0])}"
             for r in read_records("jsonl", d / "gsm8k_cal_mc.json", "true-false")
             if r["truth_answer"]]
    reclor = [f"{r['context']}\n{r['question']} {r['choices'][r['answer'][0]]}"
              for r in read_records("reclor_json", d / "reclor_val.json", "choices")]
    return interleave([truthful, gsm8k, reclor])


def interleave(sources: Sequence[Sequence[str]]) -> list[str]:
    """One item from each source in turn until all are used up."""
    out: list[str] = []
    for i in range(max((len(s) for s in sources), default=0)):
        out.extend(s[i] for s in sources if i < len(s))
    return out


def text_documents(path: str | Path) -> list[str]:
    """Paragraphs (blank-line separated) of a UTF-8 text file."""
    p = Path(path).expanduser()
    text = read_text_file(p, "text file", LcprobeError)
    docs = [d.strip() for d in re.split(r"\n\s*\n", text)]
    docs = [d for d in docs if d]
    if not docs:
        raise LcprobeError(f"{p}: no text")
    return docs


def token_windows(
    documents: Iterable[str],
    tokenize: Callable[[str], list[int]],
    window: int,
    max_tokens: int | None = None,
    prefix: Sequence[int] = (),
) -> list[list[int]]:
    """Cut the documents' token stream into windows of at most ``window`` tokens.

    ``tokenize`` maps a text to ids without special tokens; ``prefix`` (the
    BOS token, if any) starts every window and counts towards ``window`` and
    ``max_tokens``. Windows shorter than two tokens are dropped: position 0 is
    never analysed (see docs/depth.md).
    """
    prefix = list(prefix)
    room = window - len(prefix)
    if room < 1:
        raise LcprobeError(f"a window of {window} tokens leaves no room for text")
    if max_tokens is not None and max_tokens < 2:
        raise LcprobeError("--max-tokens must be at least 2")
    limit = max_tokens if max_tokens is not None else float("inf")
    windows: list[list[int]] = []
    current: list[int] = []
    used = 0  # tokens in finished windows, prefixes included
    for doc in documents:
        ids = tokenize(doc + "\n\n")
        pos = 0
        while pos < len(ids):
            cap = int(min(room - len(current), limit - used - len(prefix) - len(current)))
            if cap <= 0:
                break
            current.extend(ids[pos:pos + cap])
            pos += cap
            if len(current) == room:
                windows.append(prefix + current)
                used += window
                current = []
        if pos < len(ids):
            break
    if current:
        windows.append(prefix + current)
    return [w for w in windows if len(w) >= 2]
