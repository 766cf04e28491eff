"""`sokhan generate` and `sokhan predict`: torch-free, from an exported bundle."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


def _int_at_least(low: int):
    """An argparse type: an integer ≥ ``low``, refused as ``argument -k: …`` naming the flag (the Python API's own
    messages name its parameters)."""

    def convert(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        if number < low:
            raise argparse.ArgumentTypeError(f"{number} must be ≥ {low}")
        return number

    return convert


def _temperature(value: str) -> float:
    try:
        t = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not (math.isfinite(t) and t >= 0):
        raise argparse.ArgumentTypeError(f"{value} must be a finite number ≥ 0 (0 = greedy)")
    return t


def _as_sent(text: str) -> str:
    """An argument as the terminal sent it. Python decodes argv with the locale's encoding: under a Latin-1 locale,
    Persian typed into a UTF-8 terminal arrived as 'Ø¯Ø±' and was predicted from as Latin text, and under an ASCII
    one it was refused as not UTF-8. The bytes, where they are UTF-8, are the text; otherwise the locale's reading
    stands (and lone surrogates, bytes of no encoding, are refused below)."""
    try:
        return os.fsencode(text).decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--bundle", type=Path, required=True, help="an exported bundle (RUN/export/bundle)")
    parser.add_argument("--provider", choices=("auto", "cuda", "cpu"), default="auto",
                        help="ONNX Runtime execution provider (auto: CUDA when it loads, else CPU)")
    parser.add_argument("--graph", default="decoder.onnx",
                        help="which graph of the bundle to run (decoder.onnx, or a variant such as decoder.int8.onnx)")
    parser.add_argument("--lang", choices=("fa", "zh", "en"), default=None, help="language of the text (default: detected)")
    if name == "generate":
        parser.add_argument("--prompt", required=True,
                            help="text to continue; '-': one prompt per line of stdin, one JSON object per line out")
        parser.add_argument("--max-new-tokens", type=_int_at_least(0), default=64,
                            help="tokens to generate at most; it stops earlier at the end of a line (default: 64)")
        parser.add_argument("--temperature", type=_temperature, default=0.0, help="sampling temperature; 0 = greedy (default)")
        parser.add_argument("--top-k", type=_int_at_least(1), default=None,
                            help="sample from the k most likely tokens only (default: all)")
        parser.add_argument("--seed", type=_int_at_least(0), default=None, help="seed of the sampling, for a repeatable text")
    else:
        parser.add_argument("text", help="text whose next word to predict; '-': one text per line of stdin, one JSON "
                                         "object per line out")
        parser.add_argument("-k", type=_int_at_least(1), default=5, help="how many words (default: 5)")


def _stdin_lines():
    """(line number, text or the SokhanError that line is) for each non-blank line of stdin, read as UTF-8 whatever
    the locale: a line that is not UTF-8 is an error for that line, like an empty prompt, not for the rest."""
    import sys

    from sokhan import SokhanError

    for n, raw in enumerate(sys.stdin.buffer, start=1):
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            yield n, SokhanError(f"not valid UTF-8 (byte {e.start + 1})")
            continue
        if line.strip():
            yield n, line


def main(args: argparse.Namespace) -> int:
    import json
    import sys

    from sokhan import SokhanError
    from sokhan.export.runtime import Decoder
    from sokhan.tokenization import detect_language
    from sokhan.tokenization.langid import SCRIPT_NAMES

    generate = args.command == "generate"
    text = _as_sent(args.prompt if generate else args.text)
    batch = text == "-"  # one prompt per line of stdin, one JSON object per line out: the model is loaded once
    if not batch:
        try:
            text.encode("utf-8")  # bytes that are not UTF-8 reach argv as lone surrogates (Python's surrogateescape)
        except UnicodeEncodeError as e:
            what = "--prompt" if generate else "the text"
            raise SokhanError(f"{what} is not valid UTF-8 (at character {e.start + 1}); check the terminal's encoding") from None
    decoder = Decoder(args.bundle, provider=args.provider, graph=args.graph)
    if generate and args.temperature == 0 and (args.top_k is not None or args.seed is not None):
        print("sokhan: --top-k and --seed shape sampling; at --temperature 0 (the default) decoding is greedy",
              file=sys.stderr)

    def one(text: str, where: str) -> dict:
        detected = detect_language(text)
        if args.lang and detected and detected != args.lang:  # read as another language: tag and segmenter both wrong
            print(f"sokhan: {where}--lang {args.lang}, but the text is mostly in {SCRIPT_NAMES[detected]} script; it is "
                  f"read as {args.lang} all the same", file=sys.stderr)
        if generate:
            continuation = decoder.generate(text, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                            top_k=args.top_k, seed=args.seed, lang=args.lang)
            # The continuation follows the prompt as the model read it (normalized: ي → ی, spaces squeezed).
            return {"prompt": decoder.tokenizer.normalize(text, decoder.language(text, args.lang)), "continuation": continuation}
        found = decoder.next_words(text, k=args.k, lang=args.lang)
        if len(found) < args.k:
            print(f"sokhan: {where}{len(found)} of {args.k} words found: the search keeps continuations above "
                  "probability 1e-6 within its beam", file=sys.stderr)
        return {"text": text, "words": found}

    if batch:
        for n, line in _stdin_lines():
            try:
                if isinstance(line, SokhanError):
                    raise line
                result = one(line, f"line {n}: ")
                if "words" in result:
                    result["words"] = [[word, round(prob, 6)] for word, prob in result["words"]]
            except SokhanError as e:  # an empty prompt after normalization, say: that line, not the rest
                print(f"sokhan: line {n}: {e}", file=sys.stderr)
                result = {"error": str(e)}
            print(json.dumps({"line": n, **result}, ensure_ascii=False), flush=True)
        return 0
    result = one(text, "")
    if generate:
        print(result["prompt"] + result["continuation"])
    else:
        for word, prob in result["words"]:
            print(f"{prob:.4f}\t{word}")
    return 0
