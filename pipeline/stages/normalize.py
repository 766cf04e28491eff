"""normalize stage: corpus files -> RUN/normalize/<lang>.txt + stats.json.

Each line of each source is decoded (``corpus.errors``), given its language (the source's tag, or by script for
``auto``: see ``sokhan.tokenization.langid``), normalized (``sokhan.tokenization.normalize``), and kept unless it is
empty or, with ``normalize.dedupe``, an exact duplicate of an earlier line of the same language. ``stats.json``
counts lines and characters per language, dropped lines by reason and what ``auto`` detected.

A problem with the corpus stops the stage with one line naming it: a missing path, a binary file, invalid UTF-8
(strict policy), a source tagged with a language that yields no lines, or a corpus with no lines at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sokhan import SokhanError

SECTIONS = ("corpus", "normalize")
UPSTREAM = ()


@dataclass
class CorpusSource:
    """One corpus file or directory (all ``*.txt`` under it) and its language."""

    path: str
    lang: Literal["fa", "zh", "en", "auto"] = "auto"
    """``auto`` detects the language per line by script (Arabic -> fa, Han -> zh, Latin -> en)."""


@dataclass
class CorpusConfig:
    """Where the raw text is."""

    paths: list[CorpusSource] = field(default_factory=list)
    """Files or directories, each tagged with a language. Relative paths are relative to the config file."""
    errors: Literal["strict", "replace", "skip"] = "strict"
    """Invalid UTF-8: stop naming file and line (strict), replace with U+FFFD, or skip the line."""


@dataclass
class NormalizeConfig:
    """How each language is cleaned."""

    digits: Literal["persian", "latin", "keep"] = "persian"
    """Digits in Persian text: Persian ۰-۹ (hazm's default), Latin 0-9, or as written."""
    remove_diacritics: bool = True
    """Persian: drop harakat (fatha, kasra, …), which the corpora use inconsistently."""
    dedupe: bool = True
    """Drop exact duplicate lines (after normalization), counted in stats."""


def inputs(config) -> list[Path]:
    """Every corpus file, so that an edited file makes the stage stale."""
    if not config.corpus.paths:
        raise SokhanError("config: corpus.paths is empty; add e.g. paths = [{ path = \"data/sample/fa.txt\", lang = \"fa\" }]")
    from sokhan.tokenization.corpus import source_files

    return [f for src in config.corpus.paths for f in source_files(src.path)]


def run(ctx) -> dict:
    from sokhan.pipeline.stage import atomic_write, log, progress, write_json
    from sokhan.tokenization.corpus import read_lines, source_files
    from sokhan.tokenization.langid import LANGUAGES, detect_language
    from sokhan.tokenization.normalize import normalize

    corpus, opts = ctx.config.corpus, ctx.config.normalize
    kept: dict[str, list[str]] = {lang: [] for lang in LANGUAGES}
    seen: dict[str, set[str]] = {lang: set() for lang in LANGUAGES}
    dropped = {"empty": 0, "duplicate": 0, "invalid_utf8": 0, "no_language": 0}
    detected = {lang: 0 for lang in LANGUAGES} | {"none": 0}
    files = []
    per_source = []  # lines kept from each source
    for src in corpus.paths:
        src_lines = 0
        for path in source_files(src.path):
            read = 0
            for _, raw in progress(read_lines(path, corpus.errors), desc=f"normalize {path.name}", unit=" lines"):
                read += 1
                if raw is None:
                    dropped["invalid_utf8"] += 1
                    continue
                lang = src.lang
                if lang == "auto" and raw.strip():
                    lang = detect_language(raw)
                    detected[lang or "none"] += 1
                    if lang is None:
                        dropped["no_language"] += 1
                        continue
                line = normalize(raw, lang, digits=opts.digits, remove_diacritics=opts.remove_diacritics)
                if not line:
                    dropped["empty"] += 1
                elif opts.dedupe and line in seen[lang]:
                    dropped["duplicate"] += 1
                else:
                    seen[lang].add(line)
                    kept[lang].append(line)
                    src_lines += 1
            files.append({"path": str(path), "lang": src.lang, "lines_read": read})
        per_source.append(src_lines)

    total_lines = sum(len(v) for v in kept.values())
    if total_lines == 0:
        raise SokhanError(f"corpus: empty, no non-empty lines in {', '.join(str(s.path) for s in corpus.paths)}")
    for i, (src, n) in enumerate(zip(corpus.paths, per_source)):
        if n == 0:
            what = f"language {src.lang!r}" if src.lang != "auto" else "lang 'auto'"
            raise SokhanError(
                f"corpus.paths[{i}] ({src.path}, {what}): no lines left after normalization and "
                "deduplication; check the file and its language tag"
            )
    total_chars = sum(len(line) for v in kept.values() for line in v)
    languages = {}
    for lang, lines in kept.items():
        if not lines:
            continue
        atomic_write(ctx.out / f"{lang}.txt", "\n".join(lines) + "\n")
        chars = sum(len(line) for line in lines)
        languages[lang] = {
            "lines": len(lines),
            "chars": chars,
            "share_lines": round(len(lines) / total_lines, 6),
            "share_chars": round(chars / total_chars, 6),
        }
    stats = {
        "lines": total_lines,
        "chars": total_chars,
        "languages": languages,
        "dropped": dropped,
        "auto_detected": detected if any(s.lang == "auto" for s in corpus.paths) else {},
        "files": files,
    }
    write_json(ctx.out / "stats.json", stats)
    if stats["auto_detected"]:
        log("normalize: auto-detected lines: " + ", ".join(f"{k} {v}" for k, v in detected.items()))
    return {"lines": total_lines, "chars": total_chars, "dropped": sum(dropped.values()),
            **{f"lines_{k}": v["lines"] for k, v in languages.items()}}
