"""The logit lens of one prompt: the model's top next-token guesses after every layer.

    python examples/logit_lens.py --prompt "The capital of France is" --model smollm2-135m
"""

import argparse

import lcprobe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a .gguf path or catalog name")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("-k", type=int, default=3, help="tokens shown per layer")
    args = ap.parse_args()

    with lcprobe.load(args.model) as model:
        acts = model.capture(args.prompt)
        lp = model.logit_lens(acts, positions=[-1])  # (n_layers, 1, n_vocab)
        print(f"{model.info.name}: next token after {args.prompt!r}, per layer")
        for layer, top in zip(acts.layers(), model.top_tokens(lp[:, 0], k=args.k)):
            guesses = "  ".join(f"{text!r} {p:.2f}" for text, p in top)
            print(f"{layer:>3}  {guesses}")


if __name__ == "__main__":
    main()
