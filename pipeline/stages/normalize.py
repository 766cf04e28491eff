"""normalize stage: corpus files -> RUN/normalize/<lang>.txt + stats.json.

Each line of each source is decoded (``corpus.errors``), given its language (the source's tag, or by script for
``auto``: see ``sokhan.tokenization.langid``), normalized (``sokhan.tokenization.normalize``), and kept unless it is
empty or, with ``normalize.dedupe``, an exact duplicate of an earlier line of the same language. ``stats.json``
counts lines and characters per language, dropped lines by reason and what ``auto`` detected.

Lines are read, normalized in ``normalize.workers`` processes (chunks of ``CHUNK`` lines, results in order) and
written as they come, so memory does not grow with the corpus; the output is the same for any number of workers.

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
    workers: int = 0
    """Normalization processes; 0 = one per CPU core. The output is the same for any number."""

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise SokhanError(f"config: normalize.workers = {self.workers} must be ≥ 0 (0 = one per CPU core)")


def inputs(config) -> list[Path]:
    """Every corpus file, so that an edited file makes the stage stale."""
    if not config.corpus.paths:
        raise SokhanError("config: corpus.paths is empty; add a [[corpus.paths]] table with path = \"my/corpus.txt\" "
                          "(a file, or a folder of *.txt) and lang = \"fa\" (fa, zh, en or auto)")
    from sokhan.tokenization.corpus import source_files

    return [f for src in config.corpus.paths for f in source_files(src.path)]


CHUNK = 256  # lines sent to a worker at a time
MIN_PARALLEL_BYTES = 1 << 20  # below this much text, one process
CHECK_CHUNKS = 4  # a tagged file's first 4 chunks (1024 lines) are checked against its tag


def _normalize_chunk(job: tuple[int, str, list[str | None], dict, bool]) -> tuple[int, list, dict]:
    """The job's file index ``k``; ``(language, normalized line, detected)`` for each raw line of that file:
    ``line`` is None for a line that could not be read (None), ``language`` None where ``auto`` found none,
    ``detected``: ``auto`` looked at it (a line that is not blank); and, when the job says ``check``, how many of a
    tagged source's lines the script detection would give each language (None: no letters), to catch a wrong tag."""
    from sokhan.tokenization.langid import detect_language
    from sokhan.tokenization.normalize import normalize

    k, tag, lines, opts, check = job
    out: list[tuple[str | None, str | None, bool]] = []
    scripts: dict[str | None, int] = {}
    for raw in lines:
        if raw is None:
            out.append((None, None, False))
        elif tag == "auto" and raw.strip():
            lang = detect_language(raw)
            out.append((lang, normalize(raw, lang, **opts) if lang is not None else "", True))
        else:
            out.append((tag, normalize(raw, tag, **opts), False))
            if check and raw.strip():
                d = detect_language(raw)
                scripts[d] = scripts.get(d, 0) + 1
    return k, out, scripts


def run(ctx) -> dict:
    import hashlib
    import os
    from collections import Counter

    from sokhan.pipeline.parallel import batched, ordered_map
    from sokhan.pipeline.stage import log, progress, write_json
    from sokhan.tokenization.corpus import read_lines, source_files
    from sokhan.tokenization.langid import LANGUAGES, other_majority
    from sokhan.tokenization.normalize import normalize

    corpus, opts = ctx.config.corpus, ctx.config.normalize
    # Every file of every source, in order: (source index, source, path).
    sources = [(i, src, path) for i, src in enumerate(corpus.paths) for path in source_files(src.path)]
    workers = opts.workers or os.cpu_count() or 1
    if sum(path.stat().st_size for _, _, path in sources) < MIN_PARALLEL_BYTES:
        workers = 1  # starting the workers would take longer than the work
    options = {"digits": opts.digits, "remove_diacritics": opts.remove_diacritics}
    if workers > 1:  # hazm loads its data on first use: once here, shared by the forked workers
        for lang in {lang for src in corpus.paths for lang in ((src.lang,) if src.lang != "auto" else LANGUAGES)}:
            normalize("ا", lang, **options)

    def jobs():
        """Chunks of raw lines from every file in turn, each tagged with its file's place in ``sources``; a tagged
        file's first ``CHECK_CHUNKS`` chunks also have their script checked against the tag."""
        for k, (_, src, path) in enumerate(sources):
            for c, chunk in enumerate(batched((raw for _, raw in read_lines(path, corpus.errors)), CHUNK)):
                yield k, src.lang, chunk, options, src.lang != "auto" and c < CHECK_CHUNKS

    # Lines go to disk as they come, so memory does not grow with the corpus: the deduplication keeps a 16-byte
    # digest per line kept, not the line (a collision of BLAKE2b-128 digests is beyond any corpus's reach).
    outputs = {lang: ctx.out / f".{lang}.txt.partial" for lang in LANGUAGES}
    files_out = {lang: open(path, "w", encoding="utf-8", newline="\n") for lang, path in outputs.items()}
    seen: dict[str, set[bytes]] = {lang: set() for lang in LANGUAGES}
    lines_kept = {lang: 0 for lang in LANGUAGES}
    chars_kept = {lang: 0 for lang in LANGUAGES}
    dropped = {"empty": 0, "duplicate": 0, "invalid_utf8": 0, "no_language": 0}
    detected = {lang: 0 for lang in LANGUAGES} | {"none": 0}
    read = [0] * len(sources)  # lines read from each file
    scripts = [Counter() for _ in corpus.paths]  # per source: the language script detection gives its lines
    per_source = [0] * len(corpus.paths)  # lines kept from each source
    try:
        # One set of workers for the whole corpus (a folder of many small files would otherwise start one per file).
        with progress(desc="normalize", unit=" lines") as bar:
            for k, results, found in ordered_map(_normalize_chunk, jobs(), workers):
                bar.update(len(results))
                read[k] += len(results)
                scripts[sources[k][0]].update(found)
                for lang, line, was_detected in results:
                    if line is None:
                        dropped["invalid_utf8"] += 1
                        continue
                    if was_detected:
                        detected[lang or "none"] += 1
                    if lang is None:
                        dropped["no_language"] += 1
                        continue
                    if not line:
                        dropped["empty"] += 1
                        continue
                    if opts.dedupe:
                        digest = hashlib.blake2b(line.encode("utf-8"), digest_size=16).digest()
                        if digest in seen[lang]:
                            dropped["duplicate"] += 1
                            continue
                        seen[lang].add(digest)
                    files_out[lang].write(line + "\n")
                    lines_kept[lang] += 1
                    chars_kept[lang] += len(line)
                    per_source[sources[k][0]] += 1
    finally:
        for f in files_out.values():
            f.close()
    files = [{"path": str(path), "lang": src.lang, "lines_read": n} for (_, src, path), n in zip(sources, read)]

    for i, (src, found) in enumerate(zip(corpus.paths, scripts)):
        if src.lang != "auto" and (other := other_majority(found, src.lang)):  # a hand-typed tag can be wrong
            log(f"normalize: corpus.paths[{i}] ({src.path}) is tagged {src.lang!r}, but {other[1]} of the first "
                f"{found.total()} lines checked read as {other[0]!r} by their script; it is normalized as {src.lang!r} "
                f"all the same (check its lang, or set lang = \"auto\")")

    total_lines = sum(lines_kept.values())
    if total_lines == 0:
        raise SokhanError(f"corpus: empty, no non-empty lines in {', '.join(str(s.path) for s in corpus.paths)}")
    for i, (src, n) in enumerate(zip(corpus.paths, per_source)):
        if n == 0:
            what = f"language {src.lang!r}" if src.lang != "auto" else "lang 'auto'"
            raise SokhanError(
                f"corpus.paths[{i}] ({src.path}, {what}): no lines left after normalization"
                f"{' and deduplication' if opts.dedupe else ''}; check the file and its language tag"
            )
    total_chars = sum(chars_kept.values())
    languages = {}
    for lang in LANGUAGES:
        if not lines_kept[lang]:
            outputs[lang].unlink()
            continue
        os.replace(outputs[lang], ctx.out / f"{lang}.txt")
        languages[lang] = {
            "lines": lines_kept[lang],
            "chars": chars_kept[lang],
            "share_lines": round(lines_kept[lang] / total_lines, 6),
            "share_chars": round(chars_kept[lang] / total_chars, 6),
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
