"""normalize stage: corpus files -> RUN/normalize/<lang>.txt + stats.json."""

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


def run(ctx) -> dict:
    raise NotImplementedError("normalize stage: being written this session")
