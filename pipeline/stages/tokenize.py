"""tokenize stage: RUN/normalize -> tokenizer.json, segmenter.json, train.bin, val.bin, val/<lang>.txt, meta.json, report.json.

1. Split: per language, a seeded random ``val_fraction`` of the normalized lines, single lines or runs of
   ``val_block`` consecutive lines, is held out (``val/<lang>.txt``, in corpus order); the rest is the training split.
2. Pre-tokenize every line (hazm words for Persian, word-character runs or jieba words for Chinese, Latin rules:
   ``sokhan.tokenization.segment.pretokenize``) in ``workers`` processes: the slow, pure-Python part. Results come
   back in input order, so the output does not depend on ``workers``; they are written to scratch files, a line
   per line, which steps 3 and 4 read back.
3. Train the subword model on the training split's pieces only (the report measures unseen text), each
   language's lines repeated ``lang_weights`` times (``weighted_lines``): one vocabulary is shared by all
   languages, and without weights the largest corpus takes most of it.
4. Encode with the trained model (``Tokenizer.encode_pieces``: each distinct piece once through HF's Rust encoder,
   then a lookup per piece) and write the shards: every line becomes ``<|lang:xx|>`` + ids + ``<|eos|>``; lines
   are concatenated per split, languages in the order fa, zh, en. Same bytes for any ``workers`` (a test checks).

Every step streams, a chunk of lines at a time, so memory holds the vocabulary's statistics, not the corpus
(``benchmarks/stage_memory.py``).
5. ``report.json``: on the validation split, per language, characters per token, tokens per word (words of
   ``segment``: jieba's for Chinese whatever the pre-tokenization), UTF-8 bytes per token (> 1 means better than
   raw bytes) and the share of byte-fallback tokens (tokens that are not whole characters: a piece of a UTF-8
   sequence).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Literal

from sokhan import SokhanError

if TYPE_CHECKING:  # annotations only: imported where used, to keep importing this module cheap
    import numpy as np

SECTIONS = ("normalize", "tokenize")  # normalize's options are stored in segmenter.json and used by encode()
UPSTREAM = ("normalize",)
MAX_LANG_WEIGHT = 16.0  # a weight repeats lines: training time and memory grow with it
ENCODE_BATCH = 4096  # lines encoded and written at a time
_SEP = "\0"  # joins a line's pieces for the trip between processes; normalized text holds no control characters


def read_meta(tok_dir) -> dict:
    """``RUN/tokenize/meta.json`` with the fields later stages read checked, so that a damaged or hand-edited file
    is named in one line rather than failing as a ``KeyError`` deep inside a stage."""
    from sokhan.pipeline.stage import read_json

    path = Path(tok_dir) / "meta.json"
    meta = read_json(path)
    fields = {"dtype": str, "vocab_size": int, "special_tokens": dict}
    bad = next((k for k, kind in fields.items() if not isinstance(meta, dict) or type(meta.get(k)) is not kind), None)
    if bad is None and "<|eos|>" not in meta["special_tokens"]:
        bad = "special_tokens"
    if bad is None and meta["dtype"] not in ("uint16", "uint32"):  # what shard_dtype writes
        bad = "dtype"
    if bad is not None:
        raise SokhanError(f"{path}: field {bad!r} is missing or malformed (meta.json is written by the tokenize stage: "
                          "run `sokhan tokenize --force` to write it again)")
    return meta


@dataclass
class TokenizeConfig:
    """The subword model and the token shards."""

    model: Literal["pruned-bpe", "bpe", "unigram"] = "pruned-bpe"
    """Subword model over bytes, trained with HF tokenizers on the language-aware segmentation: ``pruned-bpe``
    (BPE candidates pruned to ``vocab_size``, text encoded into the fewest tokens; sokhan.tokenization.prune),
    ``bpe`` (HF's BPE and its merges) or ``unigram`` (HF's Unigram trainer, the one not reproducible: trained
    twice on the same text, tokenizers 0.23's Unigram trainer gives slightly different vocabularies, even on one
    thread; the two BPE models give the same bytes every run)."""
    vocab_size: int = 8000
    min_frequency: int = 2
    """BPE: a merge must occur at least this often in the training split."""
    val_fraction: float = 0.05
    """Share of each language's lines held out for validation and evaluation."""
    val_block: int = 1
    """Lines are held out in runs of this many consecutive lines: 1 holds out single lines; a passage length
    (a ghazal's 14-24 hemistichs, a few paragraphs) holds out whole passages, so a held-out line's poem or article
    is mostly held out with it, and the evaluation reads each held-out line after its own passage."""
    seed: int = 0
    """Seed of the train/validation split."""
    workers: int = 0
    """Segmentation processes; 0 = one per CPU core. The output is the same for any number."""
    zh_hmm: bool = False
    """jieba's HMM for Chinese words missing from its dictionary (slower; see sokhan.tokenization.segment)."""
    zh_pretokenize: Literal["runs", "jieba"] = "jieba"
    """Chinese pieces the subword model merges within: jieba's words (tokens never span a word, so next-word
    prediction stays word-aligned) or word-character runs (tokens may span words; 4 % fewer tokens).
    See sokhan.tokenization.segment."""
    lang_weights: dict[str, float] = field(default_factory=lambda: {"zh": 2.0})
    """How many times each language's training text counts when the vocabulary is learned (missing: 1; below 1 a
    share of the lines is left out, evenly spread). One vocabulary serves every language, and a language's share
    of it follows its share of the text: on the corpora bundle (Persian 1.34M characters, Chinese 0.43M, English
    0.12M) weights of 1 leave Chinese 3090 of 8000 tokens and 1.193 held-out characters per token, under
    SentencePiece's 1.221; zh = 2 gives it 3911 tokens and 1.234 while Persian keeps 3.136 (SentencePiece 3.098).
    Weights by corpus size (p ∝ n^α, as in XLM-R) lift the tiny English corpus most and there miss Chinese (α =
    0.5: zh 1.219). Training time grows with the weights' sum. A corpus of one language is learned as it is:
    weighting it alone would share nothing out, only repeat or drop its lines."""

    def __post_init__(self) -> None:
        if self.vocab_size < 300:
            raise SokhanError(f"config: tokenize.vocab_size = {self.vocab_size} must be ≥ 300 (256 bytes + specials + merges)")
        if not 0.0 < self.val_fraction < 0.5:
            raise SokhanError(f"config: tokenize.val_fraction = {self.val_fraction} must be in (0, 0.5)")
        if self.val_block < 1:
            raise SokhanError(f"config: tokenize.val_block = {self.val_block} must be ≥ 1 (lines per held-out run)")
        if self.min_frequency < 1:
            raise SokhanError(f"config: tokenize.min_frequency = {self.min_frequency} must be ≥ 1")
        if self.zh_pretokenize not in ("runs", "jieba"):
            raise SokhanError(f"config: tokenize.zh_pretokenize = {self.zh_pretokenize!r} must be 'runs' or 'jieba'")
        from sokhan.tokenization.langid import LANGUAGES

        for lang, weight in self.lang_weights.items():
            if lang not in LANGUAGES:
                raise SokhanError(f"config: tokenize.lang_weights.{lang}: unknown language (languages: {', '.join(LANGUAGES)})")
            if not (0.0 < weight <= MAX_LANG_WEIGHT and math.isfinite(weight)):
                raise SokhanError(f"config: tokenize.lang_weights.{lang} = {weight} must be in (0, {MAX_LANG_WEIGHT:g}]")
        if self.workers < 0:
            raise SokhanError(f"config: tokenize.workers = {self.workers} must be ≥ 0 (0 = one per CPU core)")


def weighted_lines(lines: Iterable, weight: float) -> Iterator:
    """``lines`` with line ``i`` given ``floor((i + 1) w) - floor(i w)`` times: ``weight`` copies of the whole on
    average, spread evenly (2.5: 2, 3, 2, 3, ...; 0.5: every other line), the same every run."""
    done = 0
    for i, line in enumerate(lines):
        upto = math.floor((i + 1) * weight)
        for _ in range(upto - done):
            yield line
        done = upto


def split_block(n: int, val_fraction: float, block: int) -> int:
    """The run length ``split_indices`` uses for ``n`` lines: ``block``, but never more than the ``val_fraction``
    held out (at least 1). One run of 20 was 14 of a 15-line file held out, leaving 36 tokens to train on."""
    return max(1, min(block, int(n * val_fraction)))


def split_indices(n: int, val_fraction: float, seed: int, lang: str, block: int = 1) -> list[int]:
    """Sorted indices of the held-out lines among ``n``: a seeded random ``val_fraction`` of the runs of
    ``split_block`` consecutive lines (the last run may be shorter), at least one run and never all of them
    (when n ≥ 2)."""
    import numpy as np

    from sokhan.tokenization.langid import LANGUAGES

    if n < 2:
        return []
    block = min(split_block(n, val_fraction, block), n - 1)  # two runs at least, so both splits get lines
    runs = -(-n // block)
    k = min(runs - 1, max(1, round(runs * val_fraction)))
    rng = np.random.default_rng([seed, LANGUAGES.index(lang)])
    return sorted(i for r in rng.permutation(runs)[:k] for i in range(int(r) * block, min(n, (int(r) + 1) * block)))


def shard_dtype(vocab_size: int):
    """uint16 when every id fits in it, else uint32."""
    import numpy as np

    return np.uint16 if vocab_size <= 2**16 else np.uint32


def _segment_chunk(job: tuple[str, list[str], dict]) -> list[str]:
    from sokhan.tokenization.segment import SegmenterConfig, pretokenize

    lang, lines, seg = job
    cfg = SegmenterConfig(**seg)
    return [_SEP.join(pretokenize(line, lang, cfg)) for line in lines]


def segment_stream(lines: Iterable[str], lang: str, seg, workers: int, chunk: int = 256,
                   total: int | None = None) -> Iterator[str]:
    """``pretokenize`` pieces of every line, joined by ``_SEP``, in order, in ``workers`` processes (the same for any
    ``workers``), a bounded number of chunks of ``chunk`` lines in flight (``ordered_map``), so memory does not grow
    with the corpus. ``total``: the number of lines, for the progress bar."""
    from sokhan.pipeline.parallel import batched, ordered_map
    from sokhan.pipeline.stage import progress
    from sokhan.tokenization.segment import preload

    if workers > 1:
        preload(lang)  # loaded once here; forked workers share the dictionaries instead of loading their own
    jobs = ((lang, part, seg.to_dict()) for part in batched(lines, chunk))
    with progress(total=None if total is None else -(-total // chunk), desc=f"segment {lang}") as bar:
        for part in ordered_map(_segment_chunk, jobs, workers):
            yield from part
            bar.update()


def segment_lines(lines: list[str], lang: str, seg, workers: int, chunk: int = 256) -> list[list[str]]:
    """``pretokenize`` pieces of every line (``segment_stream``, as lists)."""
    return [s.split(_SEP) if s else [] for s in segment_stream(lines, lang, seg, workers, chunk, total=len(lines))]


def _pieces(joined: str) -> list[str]:
    return joined.split(_SEP) if joined else []


def _read_lines(path) -> Iterator[str]:
    """The lines of a file the stage wrote (normalized text, joined pieces), one at a time."""
    with open(path, encoding="utf-8", newline="\n") as f:
        for line in f:
            yield line[:-1]


def _count_lines(path) -> int:
    n = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            n += block.count(b"\n")
    return n


def _encoded(tok, lang: str, joined: Iterable[str], dtype) -> Iterator[tuple[list[list[str]], list[list[int]], "np.ndarray"]]:
    """For each ``ENCODE_BATCH`` lines of ``_SEP``-joined pieces: the pieces, their ids, and the lines framed for the
    shard (``_frame``)."""
    from sokhan.pipeline.parallel import batched
    from sokhan.pipeline.stage import progress

    for batch in progress(batched(joined, ENCODE_BATCH), desc=f"encode {lang}"):
        pieces = [_pieces(j) for j in batch]
        ids = tok.encode_pieces(pieces)
        yield pieces, ids, _frame(ids, tok.lang_id(lang), tok.eos_id, dtype)


def _frame(ids: list[list[int]], lang_id: int, eos_id: int, dtype):
    """``<|lang|>`` + ids + ``<|eos|>`` for every line, concatenated."""
    import numpy as np

    out = []
    for line in ids:
        out.append(lang_id)
        out.extend(line)
        out.append(eos_id)
    return np.asarray(out, dtype=dtype)


def _fallback_table(tok) -> "np.ndarray":
    """(V,) bool: token is a byte-fallback token (its bytes are not whole UTF-8 characters)."""
    import numpy as np

    table = np.zeros(tok.vocab_size, dtype=bool)
    for i in range(tok.vocab_size):
        try:
            tok.id_to_bytes(i).decode("utf-8")
        except UnicodeDecodeError:
            table[i] = True
    return table


def report_counts(lines: list[str], words_per_line: list[list[str]], ids: list[list[int]], fallback) -> dict[str, int]:
    """What ``language_report`` divides, for some lines of one language: chunks' counts add up to the whole's.

    ``words_per_line``: each line's ``segment`` words (the unit of tokens per word).
    """
    import numpy as np

    from sokhan.tokenization.segment import words

    flat = np.fromiter((t for line in ids for t in line), dtype=np.int64)
    return {
        "lines": len(lines),
        "chars": sum(len(line) for line in lines),
        "bytes": sum(len(line.encode("utf-8")) for line in lines),
        "words": sum(words(p) for p in words_per_line),
        "tokens": int(flat.size),
        "fallback": int(fallback[flat].sum()),
    }


def report_from_counts(c: dict[str, int]) -> dict:
    """Compression figures of one language's validation split (specials not counted as tokens)."""
    tokens, n_words = c["tokens"], c["words"]
    return {
        "lines": c["lines"],
        "chars": c["chars"],
        "bytes": c["bytes"],
        "words": n_words,
        "tokens": tokens,
        "chars_per_token": round(c["chars"] / tokens, 4) if tokens else None,
        "tokens_per_word": round(tokens / n_words, 4) if n_words else None,
        "bytes_per_token": round(c["bytes"] / tokens, 4) if tokens else None,
        "byte_fallback_share": round(c["fallback"] / tokens, 6) if tokens else None,
    }


def language_report(lines: list[str], words_per_line: list[list[str]], ids: list[list[int]], fallback) -> dict:
    """``report_from_counts`` of all of ``lines`` at once."""
    return report_from_counts(report_counts(lines, words_per_line, ids, fallback))


def run(ctx) -> dict:
    import contextlib
    import os
    import tempfile
    from collections import Counter

    import numpy as np

    from sokhan.pipeline.stage import log, progress, write_json
    from sokhan.tokenization.langid import LANGUAGES
    from sokhan.tokenization.segment import SegmenterConfig, segment
    from sokhan.tokenization.tokenizer import Tokenizer

    cfg, norm = ctx.config.tokenize, ctx.config.normalize
    src = ctx.upstream("normalize")
    workers = cfg.workers or os.cpu_count() or 1
    seg = SegmenterConfig(zh_hmm=cfg.zh_hmm, zh_pretokenize=cfg.zh_pretokenize)
    langs = [lang for lang in LANGUAGES if (src / f"{lang}.txt").exists()]
    if not langs:
        raise SokhanError(f"{src}: no <lang>.txt files; rerun `sokhan normalize --force --run-dir {ctx.run_dir}`")

    # Every pass reads from disk and writes as it goes, so memory holds the vocabulary's statistics and one chunk of
    # lines, not the corpus: each language's pieces are written once to scratch files (``_SEP``-joined, a line per
    # line, the training split and the held-out one apart) and read back to train the model and to encode.
    with tempfile.TemporaryDirectory(dir=ctx.out, prefix=".scratch") as tmp:
        scratch = Path(tmp)
        held_out: dict[str, np.ndarray] = {}  # per language: line i is held out
        for lang in langs:
            n = _count_lines(src / f"{lang}.txt")
            held_out[lang] = np.zeros(n, dtype=bool)
            held_out[lang][split_indices(n, cfg.val_fraction, cfg.seed, lang, cfg.val_block)] = True
            if split_block(n, cfg.val_fraction, cfg.val_block) < cfg.val_block:
                log(f"tokenize: {lang} has {n} lines: held out in runs of "
                    f"{split_block(n, cfg.val_fraction, cfg.val_block)}, not tokenize.val_block = {cfg.val_block} "
                    f"(a run may not exceed the {cfg.val_fraction:.0%} held out)")
            pieces = segment_stream(_read_lines(src / f"{lang}.txt"), lang, seg, workers, total=n)
            # closing() ends the stream, and its worker processes, here: zip stops at the mask's end without asking
            # the stream for the end it has reached.
            with open(scratch / f"{lang}.train", "w", encoding="utf-8") as tr, \
                    open(scratch / f"{lang}.val", "w", encoding="utf-8") as va, contextlib.closing(pieces):
                for val, joined in zip(held_out[lang], pieces):
                    (va if val else tr).write(joined + "\n")

        # Weights share one vocabulary out between languages. Alone, a language's weight would only repeat its
        # lines (every piece seen once passing min_frequency = 2 at zh = 2, the default) or drop some of them.
        weight = {lang: cfg.lang_weights.get(lang, 1.0) if len(langs) > 1 else 1.0 for lang in langs}

        def training_pieces():
            for lang in langs:
                yield from weighted_lines(map(_pieces, _read_lines(scratch / f"{lang}.train")), weight[lang])

        weights = ", ".join(f"{lang} {weight[lang]:g}" for lang in langs)
        log(f"tokenize: training {cfg.model} with vocabulary {cfg.vocab_size}" + (f" (language weights {weights})" if len(langs) > 1 else ""))
        if cfg.model == "unigram":
            log("tokenize: HF's Unigram trainer is not reproducible: trained again on the same text it gives slightly "
                "other scores, so other shards (pruned-bpe and bpe give the same bytes every run)")
        length = sum(math.floor(int((~held_out[lang]).sum()) * weight[lang]) for lang in langs)
        tok = Tokenizer.train(
            progress(training_pieces(), total=length, desc="tokenizer: count pieces", unit=" lines"), cfg.vocab_size,
            model=cfg.model, min_frequency=cfg.min_frequency,
            normalization={"digits": norm.digits, "remove_diacritics": norm.remove_diacritics}, segmenter=seg,
            length=length,
        )
        tok.save(ctx.out)
        if tok.vocab_size < cfg.vocab_size:  # BPE stops when no pair occurs min_frequency times: a small corpus
            log(f"tokenize: the corpus gave {tok.vocab_size} tokens, fewer than tokenize.vocab_size = {cfg.vocab_size}; "
                "the model is sized for the smaller vocabulary (add text, or lower tokenize.vocab_size or min_frequency)")

        dtype = shard_dtype(tok.vocab_size)
        fallback = _fallback_table(tok)
        counts: dict[str, dict[str, int]] = {"train": {}, "val": {}}
        report: dict[str, dict] = {}
        (ctx.out / "val").mkdir()
        with open(ctx.out / "train.bin", "wb") as train_bin, open(ctx.out / "val.bin", "wb") as val_bin:
            for lang in langs:
                counts["train"][lang] = 0
                for _, _, arr in _encoded(tok, lang, _read_lines(scratch / f"{lang}.train"), dtype):
                    train_bin.write(arr.tobytes())
                    counts["train"][lang] += int(arr.size)
                # The held-out lines, the text beside their pieces (same order), for val/<lang>.txt and the report.
                counts["val"][lang] = 0
                text = (line for val, line in zip(held_out[lang], _read_lines(src / f"{lang}.txt")) if val)
                sums: Counter = Counter()
                with open(ctx.out / "val" / f"{lang}.txt", "w", encoding="utf-8") as val_txt:
                    for pieces, ids, arr in _encoded(tok, lang, _read_lines(scratch / f"{lang}.val"), dtype):
                        val_bin.write(arr.tobytes())
                        counts["val"][lang] += int(arr.size)
                        lines = list(itertools.islice(text, len(pieces)))
                        val_txt.write("".join(line + "\n" for line in lines))
                        same = lang != "zh" or seg.zh_pretokenize == "jieba"  # the pieces are the words already
                        words = pieces if same else [segment(line, lang, seg) for line in lines]
                        sums.update(report_counts(lines, words, ids, fallback))
                report[lang] = report_from_counts(sums)  # a Counter: an empty split's counts read 0

    meta = {
        "dtype": np.dtype(dtype).name,
        "vocab_size": tok.vocab_size,
        "special_tokens": tok.special_tokens,
        "tokens": counts,
        "split_seed": cfg.seed,
    }
    write_json(ctx.out / "meta.json", meta)
    write_json(ctx.out / "report.json", {"model": cfg.model, "vocab_size": tok.vocab_size, "split": "val", "languages": report})
    return {
        "vocab_size": tok.vocab_size,
        "train_tokens": sum(counts["train"].values()),
        "val_tokens": sum(counts["val"].values()),
        **{f"chars_per_token_{lang}": r["chars_per_token"] for lang, r in report.items()},
    }
