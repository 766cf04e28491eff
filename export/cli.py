"""`sokhan generate` and `sokhan predict`: torch-free, from an exported bundle."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--bundle", type=Path, required=True, help="an exported bundle (RUN/export/bundle)")
    parser.add_argument("--provider", choices=("auto", "cuda", "cpu"), default="auto",
                        help="ONNX Runtime execution provider (auto: CUDA when it loads, else CPU)")
    parser.add_argument("--graph", default="decoder.onnx",
                        help="which graph of the bundle to run (decoder.onnx, or a variant such as decoder.int8.onnx)")
    parser.add_argument("--lang", choices=("fa", "zh", "en"), default=None, help="language of the text (default: detected)")
    if name == "generate":
        parser.add_argument("--prompt", required=True, help="text to continue")
        parser.add_argument("--max-new-tokens", type=int, default=64,
                            help="tokens to generate at most; it stops earlier at the end of a line (default: 64)")
        parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
        parser.add_argument("--top-k", type=int, default=None,
                            help="sample from the k most likely tokens only (default: all)")
        parser.add_argument("--seed", type=int, default=None, help="seed of the sampling, for a repeatable text")
    else:
        parser.add_argument("text", help="text whose next word to predict")
        parser.add_argument("-k", type=int, default=5, help="how many words")


def main(args: argparse.Namespace) -> int:
    import sys

    from sokhan import SokhanError
    from sokhan.export.runtime import Decoder
    from sokhan.tokenization import detect_language
    from sokhan.tokenization.langid import SCRIPT_NAMES

    text = args.prompt if args.command == "generate" else args.text
    try:
        text.encode("utf-8")  # bytes that are not UTF-8 reach argv as lone surrogates (Python's surrogateescape)
    except UnicodeEncodeError as e:
        what = "--prompt" if args.command == "generate" else "the text"
        raise SokhanError(f"{what} is not valid UTF-8 (at character {e.start + 1}); check the terminal's encoding") from None
    decoder = Decoder(args.bundle, provider=args.provider, graph=args.graph)
    detected = detect_language(text)
    if args.lang and detected and detected != args.lang:  # read as another language: tag and segmenter both wrong
        print(f"sokhan: --lang {args.lang}, but the text is mostly in {SCRIPT_NAMES[detected]} script; it is read as {args.lang} "
              "all the same", file=sys.stderr)
    if args.command == "generate":
        if args.temperature == 0 and (args.top_k is not None or args.seed is not None):
            print("sokhan: --top-k and --seed shape sampling; at --temperature 0 (the default) decoding is greedy",
                  file=sys.stderr)
        text = decoder.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, seed=args.seed, lang=args.lang)
        # The continuation follows the prompt as the model read it (normalized: ي → ی, spaces squeezed), not as typed.
        print(decoder.tokenizer.normalize(args.prompt, decoder.language(args.prompt, args.lang)) + text)
    else:
        found = decoder.next_words(args.text, k=args.k, lang=args.lang)
        for word, prob in found:
            print(f"{prob:.4f}\t{word}")
        if len(found) < args.k:
            print(f"sokhan: {len(found)} of {args.k} words found: the search keeps continuations above probability "
                  "1e-6 within its beam", file=sys.stderr)
    return 0
