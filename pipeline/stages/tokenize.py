"""tokenize stage: RUN/normalize -> tokenizer.json, segmenter.json, train.bin, val.bin, meta.json, report.json."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sokhan import SokhanError

SECTIONS = ("tokenize",)
UPSTREAM = ("normalize",)


@dataclass
class TokenizeConfig:
    """The subword model and the token shards."""

    model: Literal["bpe", "unigram"] = "bpe"
    """Byte-level BPE (default) or Unigram, trained with HF tokenizers on the language-aware segmentation."""
    vocab_size: int = 8000
    min_frequency: int = 2
    val_fraction: float = 0.05
    """Share of each language's lines held out for validation and evaluation."""
    seed: int = 0
    """Seed of the train/validation split."""
    workers: int = 0
    """Encoding processes; 0 = one per CPU core."""

    def __post_init__(self) -> None:
        if self.vocab_size < 300:
            raise SokhanError(f"config: tokenize.vocab_size = {self.vocab_size} must be ≥ 300 (256 bytes + specials + merges)")
        if not 0.0 < self.val_fraction < 0.5:
            raise SokhanError(f"config: tokenize.val_fraction = {self.val_fraction} must be in (0, 0.5)")


def run(ctx) -> dict:
    raise NotImplementedError("tokenize stage: being written this session")
