"""Text front end throughput and compression on ../shared/corpora.

Throughput, per language, in MB of UTF-8 input per CPU-second (= per core; CPU time, so that other processes on a
shared machine do not count against us) for each step on its own: ``normalize`` (raw lines), ``pretokenize``
(normalized lines: hazm words for Persian, jieba words for Chinese), ``encode`` (the subword model on
pre-tokenized lines: the plain HF ``encode`` per line, then ours
with its piece cache per line from empty, in one batch from empty, per line once warm), the whole
``Tokenizer.encode`` path (normalize + pretokenize + model) per line, and, in wall-clock time, the tokenize stage's
path with 2 worker processes (pre-tokenization in the workers, then the model); the machine's load average is
printed with it, since wall-clock figures on a shared machine mean little.

Compression: our tokenizer (byte-level BPE on the tokenize stage's pre-tokenization, trained by its code) with
Chinese as jieba's words (the default) and as word-character runs (``tokenize.zh_pretokenize = "runs"``), against
a SentencePiece unigram model (``byte_fallback``, ``character_coverage=0.9995``, identity normalization since the
text is normalized already) trained on the same training lines with the same vocabulary size; characters per
token on the held-out lines (the tokenize stage's split), more is better, and our share of byte-fallback tokens
(tokens that are not whole UTF-8 characters, as in the stage's report).

    python benchmarks/frontend.py [--vocab-size 8000] [--corpora ../shared/corpora]

Writes benchmarks/out/frontend.json and prints a markdown table.
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

REPO = Path(__file__).resolve().parents[1]
LANGS = ("fa", "zh", "en")


def _cpu(fn):
    """(result, CPU seconds, wall seconds) of ``fn()``."""
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c, time.perf_counter() - w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpora", type=Path, default=REPO.parent / "shared" / "corpora")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--val-fraction", type=float, default=0.05)
    args = parser.parse_args()

    import sentencepiece as spm

    from sokhan.pipeline.stages.tokenize import _fallback_table, segment_lines, split_indices
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
    train_pieces = [p for lang in LANGS for i, p in enumerate(pieces[lang]) if i not in split[lang]]
    tok, c_train, w_train = _cpu(lambda: Tokenizer.train(iter(train_pieces), args.vocab_size))
    # The same with word-character runs as the Chinese pieces (tokens may span words).
    runs_cfg = SegmenterConfig(zh_pretokenize="runs")
    runs_pieces = {lang: pieces[lang] if lang != "zh" else [pretokenize(t, lang, runs_cfg) for t in norm[lang]] for lang in LANGS}
    runs_tok = Tokenizer.train(
        iter([p for lang in LANGS for i, p in enumerate(runs_pieces[lang]) if i not in split[lang]]), args.vocab_size,
        segmenter=runs_cfg,
    )

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
            val = [norm[lang][i] for i in sorted(split[lang])]
            chars = sum(map(len, val))
            ids = [t for line in tok.encode_pieces([pieces[lang][i] for i in sorted(split[lang])]) for t in line]
            ours_runs = sum(len(x) for x in runs_tok.encode_pieces([runs_pieces[lang][i] for i in sorted(split[lang])]))
            theirs = sum(len(x) for x in sp.encode(val))
            compression[lang] = {"val_lines": len(val), "val_chars": chars, "ours_chars_per_token": chars / len(ids),
                                 "ours_zh_runs_chars_per_token": chars / ours_runs,
                                 "sentencepiece_chars_per_token": chars / theirs, "ratio": theirs / len(ids),
                                 "ours_byte_fallback_share": float(fallback[ids].mean())}

    result = {
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg()},
        "vocab_size": args.vocab_size,
        "throughput_MB_per_cpu_second": speed,
        "train_seconds": {"ours_cpu": c_train, "ours_wall": w_train, "sentencepiece_cpu": c_sp, "sentencepiece_wall": w_sp},
        "compression": compression,
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
    print("| lang | held-out lines | ours (default) | ours, zh as word-character runs | SentencePiece unigram "
          "| SP tokens / our tokens | our byte-fallback share |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for lang, c in compression.items():
        print(f"| {lang} | {c['val_lines']} | {c['ours_chars_per_token']:.3f} | {c['ours_zh_runs_chars_per_token']:.3f} "
              f"| {c['sentencepiece_chars_per_token']:.3f} | {c['ratio']:.3f} | {c['ours_byte_fallback_share']:.4f} |")
    print(f"\n-> {out.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
