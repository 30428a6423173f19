"""Score your own multiple-choice question at every layer: where does the right answer win?

    python examples/score_question.py --model smollm2-135m
"""

import argparse

import numpy as np

import lcprobe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a .gguf path or catalog name")
    ap.add_argument("--context", default="Q: Which planet is the largest in the solar system?\nA:")
    ap.add_argument("--choices", default="Jupiter,Mars,Venus,Mercury",
                    help="comma-separated; the first is the right one")
    args = ap.parse_args()
    choices = [" " + c.strip() for c in args.choices.split(",")]

    with lcprobe.load(args.model) as model:
        scores = model.score(args.context, choices)  # (n_choices, n_layers): summed log-probs
    winners = scores.argmax(axis=0)
    print(f"{'layer':>5}  {'winner':<12} margin of the right answer")
    for layer, (w, col) in enumerate(zip(winners, scores.T), start=1):
        margin = col[0] - np.max(np.delete(col, 0))
        print(f"{layer:>5}  {choices[w].strip():<12} {margin:+.2f}{'  <- right' if w == 0 else ''}")
    right = np.flatnonzero(winners == 0) + 1
    print(f"the right answer wins at {len(right)} of {scores.shape[1]} layers"
          + (f", first at layer {right[0]}" if len(right) else ""))


if __name__ == "__main__":
    main()
