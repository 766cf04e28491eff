"""Text front end throughput and compression on ../shared/corpora.

Throughput, per language, in MB of UTF-8 input per CPU-second (= per core; CPU time, so that other processes on a
shared machine do not count against us) for each step on its own: ``normalize`` (raw lines), ``pretokenize``
(normalized lines: hazm words for Persian, jieba words for Chinese), ``encode`` (the subword model on
pre-tokenized lines: the plain HF ``encode`` per line, then ours
with its piece cache per line from empty, in one batch from empty, per line once warm), the whole
``Tokenizer.encode`` path (normalize + pretokenize + model) per line, and, in wall-clock time, the tokenize stage's
path with 2 worker processes (pre-tokenization in the workers, then the model); the machine's load average is
printed with it, since wall-clock figures on a shared machine mean little.

Compression: our tokenizer with the tokenize stage's defaults (``TokenizeConfig()``: pruned byte-level BPE,
language weights, trained by the stage's code on its pre-tokenization, Chinese as jieba's words) against a
SentencePiece unigram model (``byte_fallback``, ``character_coverage=0.9995``, identity normalization since the
text is normalized already) trained on the same training lines (unweighted) with the same vocabulary size;
characters per token on the held-out lines (the tokenize stage's split), more is better, and our share of
byte-fallback tokens (tokens that are not whole UTF-8 characters, as in the stage's report). Ablations: plain BPE
(the previous default) and pruned BPE, each with weights 1 and with the default weights, and the default with
Chinese as word-character runs (``tokenize.zh_pretokenize = "runs"``); for each, how many vocabulary tokens are
Persian (Arabic script), Han, Latin, or partial UTF-8 sequences.

    python benchmarks/frontend.py [--vocab-size 8000] [--corpora ../shared/corpora]

Writes benchmarks/out/frontend.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench_cli import positive, run

REPO = Path(__file__).resolve().parents[1]
LANGS = ("fa", "zh", "en")


def _cpu(fn):
    """(result, CPU seconds, wall seconds) of ``fn()``."""
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c, time.perf_counter() - w


def _weights(weights: dict[str, float]) -> str:
    return "weights " + ", ".join(f"{lang} {w:g}" for lang, w in weights.items())


def _kind(text: str) -> str:
    """The script of a token's text: Arabic (Persian), Han, Latin, or other (digits, punctuation, spaces)."""
    for c in text:
        if "\u0600" <= c <= "\u06ff" or "\ufb50" <= c <= "\ufeff":
            return "Arabic"
        if "\u3400" <= c <= "\u9fff" or "\uf900" <= c <= "\ufaff":
            return "Han"
    return "Latin" if any(c.isascii() and c.isalpha() for c in text) else "other"


def vocabulary_shares(tok) -> dict[str, int]:
    """How many of ``tok``'s tokens are of each script; ``partial UTF-8``: several bytes that are no whole character."""
    from collections import Counter

    counts: Counter = Counter()
    specials = set(tok.special_tokens.values())
    for i in range(tok.vocab_size):
        raw = tok.id_to_bytes(i)
        if i in specials or len(raw) == 1:
            continue  # the same in every tokenizer: specials and the byte alphabet
        try:
            counts[_kind(raw.decode("utf-8"))] += 1
        except UnicodeDecodeError:
            counts["partial UTF-8"] += 1
    return dict(counts)


def sentencepiece_shares(sp) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(_kind(sp.id_to_piece(i)) for i in range(sp.get_piece_size()) if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpora", type=Path, default=REPO.parent / "shared" / "corpora")
    parser.add_argument("--vocab-size", type=positive, default=8000)
    parser.add_argument("--val-fraction", type=float, default=0.05)
    args = parser.parse_args()

    import sentencepiece as spm

    from sokhan.pipeline.stages.tokenize import TokenizeConfig, _fallback_table, segment_lines, split_indices, weighted_lines
    from sokhan.tokenization import SegmenterConfig, Tokenizer, normalize, pretokenize
    from sokhan.tokenization.corpus import read_lines, source_files
    from sokhan.tokenization.segment import preload

    raw = {lang: [t for f in source_files(args.corpora / lang) for _, t in read_lines(f)] for lang in LANGS}
    normalize("warm up", "fa")  # hazm's dictionaries and jieba's prefix dict load once; not part of throughput
    for lang in LANGS:
        preload(lang)

    speed: dict[str, dict] = {}
    norm: dict[str, list[str]] = {}
    pieces: dict[str, list[list[str]]] = {}
    for lang in LANGS:
        mb = sum(len(t.encode()) for t in raw[lang]) / 1e6
        lines, c_norm, _ = _cpu(lambda: [normalize(t, lang) for t in raw[lang]])
        seen: set[str] = set()
        norm[lang] = [t for t in lines if t and not (t in seen or seen.add(t))]
        mb_norm = sum(len(t.encode()) for t in norm[lang]) / 1e6
        pieces[lang], c_seg, _ = _cpu(lambda: [pretokenize(t, lang) for t in norm[lang]])
        speed[lang] = {"MB_raw": round(mb, 3), "normalize_MBps": mb / c_norm, "pretokenize_MBps": mb_norm / c_seg,
                       "normalize_segment_MBps": mb / (c_norm + c_seg * mb / mb_norm)}

    split = {lang: set(split_indices(len(norm[lang]), args.val_fraction, 0, lang)) for lang in LANGS}
    default = TokenizeConfig()
    runs_cfg = SegmenterConfig(zh_pretokenize="runs")
    runs_pieces = {lang: pieces[lang] if lang != "zh" else [pretokenize(t, lang, runs_cfg) for t in norm[lang]] for lang in LANGS}

    def train(model: str, weights: dict[str, float], by_lang=pieces, segmenter=SegmenterConfig()):
        """A tokenizer trained as the tokenize stage does it: training lines only, each language repeated by its weight."""
        lines = [
            p for lang in LANGS
            for p in weighted_lines([x for i, x in enumerate(by_lang[lang]) if i not in split[lang]], weights.get(lang, 1.0))
        ]
        return Tokenizer.train(iter(lines), args.vocab_size, model=model, min_frequency=default.min_frequency, segmenter=segmenter)

    tok, c_train, w_train = _cpu(lambda: train(default.model, default.lang_weights))
    # Ablations: the model and the language weights one at a time (the first row is the previous default), and
    # the default with word-character runs as the Chinese pieces (tokens may then span jieba's words).
    variants = {
        "bpe, weights 1": train("bpe", {}),
        f"bpe, {_weights(default.lang_weights)}": train("bpe", default.lang_weights),
        "pruned-bpe, weights 1": train("pruned-bpe", {}),
        f"pruned-bpe, {_weights(default.lang_weights)} (default)": tok,
        "default, zh as word-character runs": train(default.model, default.lang_weights, runs_pieces, runs_cfg),
    }

    for lang in LANGS:
        mb_norm = sum(len(t.encode()) for t in norm[lang]) / 1e6
        _, c_hf, _ = _cpu(lambda: [tok.hf.encode(p, is_pretokenized=True) for p in pieces[lang]])
        tok._cache.clear()
        _, c_line, _ = _cpu(lambda: [tok.encode_pieces([p]) for p in pieces[lang]])
        tok._cache.clear()
        _, c_batch, _ = _cpu(lambda: tok.encode_pieces(pieces[lang]))
        _, c_warm, _ = _cpu(lambda: [tok.encode_pieces([p]) for p in pieces[lang]])
        tok._cache.clear()
        sample = raw[lang][: max(1, len(raw[lang]) // 4)]
        mb_sample = sum(len(t.encode()) for t in sample) / 1e6
        _, c_full, _ = _cpu(lambda: [tok.encode(t, lang) for t in sample])
        # The tokenize stage's path on 2 processes: segmentation in worker processes, then the model (wall clock).
        tok._cache.clear()
        _, _, w_stage = _cpu(lambda: tok.encode_pieces(segment_lines(norm[lang], lang, tok.segmenter, workers=2)))
        speed[lang] |= {"hf_encode_MBps": mb_norm / c_hf, "encode_line_MBps": mb_norm / c_line,
                        "encode_batch_MBps": mb_norm / c_batch, "encode_warm_MBps": mb_norm / c_warm,
                        "tokenizer_encode_MBps": mb_sample / c_full, "segment_encode_2proc_wall_MBps": mb_norm / w_stage}

    compression: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        train_txt = Path(tmp) / "train.txt"
        train_txt.write_text("".join(t + "\n" for lang in LANGS for i, t in enumerate(norm[lang]) if i not in split[lang]), encoding="utf-8")
        _, c_sp, w_sp = _cpu(lambda: spm.SentencePieceTrainer.train(
            input=str(train_txt), model_prefix=f"{tmp}/sp", vocab_size=args.vocab_size, model_type="unigram",
            character_coverage=0.9995, byte_fallback=True, normalization_rule_name="identity",
            input_sentence_size=0, max_sentence_length=1 << 20, num_threads=os.cpu_count() or 1, minloglevel=2,
        ))
        sp = spm.SentencePieceProcessor(model_file=f"{tmp}/sp.model")
        fallback = _fallback_table(tok)
        for lang in LANGS:
            held = sorted(split[lang])
            val = [norm[lang][i] for i in held]
            chars = sum(map(len, val))
            ids = [t for line in tok.encode_pieces([pieces[lang][i] for i in held]) for t in line]
            theirs = sum(len(x) for x in sp.encode(val))
            compression[lang] = {"val_lines": len(val), "val_chars": chars, "ours_chars_per_token": chars / len(ids),
                                 "sentencepiece_chars_per_token": chars / theirs, "ratio": theirs / len(ids),
                                 "ours_byte_fallback_share": float(fallback[ids].mean())}
            for name, t in variants.items():
                by_lang = runs_pieces if t.segmenter.zh_pretokenize == "runs" else pieces
                n = sum(len(x) for x in t.encode_pieces([by_lang[lang][i] for i in held]))
                compression[lang].setdefault("variants_chars_per_token", {})[name] = chars / n
    shares = {name: vocabulary_shares(t) for name, t in variants.items()}
    shares["SentencePiece unigram"] = sentencepiece_shares(sp)

    result = {
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg()},
        "vocab_size": args.vocab_size,
        "throughput_MB_per_cpu_second": speed,
        "train_seconds": {"ours_cpu": c_train, "ours_wall": w_train, "sentencepiece_cpu": c_sp, "sentencepiece_wall": w_sp},
        "compression": compression,
        "vocabulary_shares": shares,
    }
    out = REPO / "benchmarks" / "out" / "frontend.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"Throughput in MB of UTF-8 input per CPU-second (= per core), except the last column (wall clock, 2 processes; "
          f"load average at the end {load} on {os.cpu_count()} cores)\n")
    print("| lang | MB | normalize | pretokenize | normalize + pretokenize | HF encode per line | encode per line, cold cache "
          "| encode one batch, cold | encode per line, warm | Tokenizer.encode (all steps) | pretokenize + encode, 2 processes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for lang, s in speed.items():
        cols = ("normalize_MBps", "pretokenize_MBps", "normalize_segment_MBps", "hf_encode_MBps", "encode_line_MBps",
                "encode_batch_MBps", "encode_warm_MBps", "tokenizer_encode_MBps", "segment_encode_2proc_wall_MBps")
        print(f"| {lang} | {s['MB_raw']:.2f} | " + " | ".join(f"{s[c]:.2f}" for c in cols) + " |")
    print(f"\nCharacters per token on held-out lines, vocabulary {args.vocab_size} (higher is better)\n")
    print("| lang | held-out lines | ours (default) | SentencePiece unigram | SP tokens / our tokens | our byte-fallback share |")
    print("|---|---:|---:|---:|---:|---:|")
    for lang, c in compression.items():
        print(f"| {lang} | {c['val_lines']} | {c['ours_chars_per_token']:.3f} | {c['sentencepiece_chars_per_token']:.3f} "
              f"| {c['ratio']:.3f} | {c['ours_byte_fallback_share']:.4f} |")
    print("\nAblations: characters per token on the same held-out lines, and the vocabulary's tokens by script\n")
    kinds = ("Arabic", "Han", "Latin", "partial UTF-8")
    print("| tokenizer | " + " | ".join(LANGS) + " | " + " | ".join(f"{k} tokens" for k in kinds) + " |")
    print("|---|" + "---:|" * (len(LANGS) + len(kinds)))
    for name in [*variants, "SentencePiece unigram"]:
        key = "sentencepiece_chars_per_token" if name == "SentencePiece unigram" else None
        cpt = [compression[lang][key] if key else compression[lang]["variants_chars_per_token"][name] for lang in LANGS]
        print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in cpt) + " | " + " | ".join(str(shares[name].get(k, 0)) for k in kinds) + " |")
    print(f"\n-> {out.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    run(main)
