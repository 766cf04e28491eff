"""A tiny run directory for the embed / train tests: ``RUN/tokenize`` made directly, without the front-end stages.

Text comes from one small Markov chain per language (Persian, Chinese, English words), so a model has structure to
learn (the validation loss can fall below the unigram entropy) and the embedding plot has real words to label.
The tokenizer is a real sokhan ``Tokenizer`` trained on the pre-segmented words (no jieba / hazm needed), and the
shards follow the tokenize stage's layout: ``<|lang:xx|>`` + tokens + ``<|eos|>`` per line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sokhan.pipeline.config import RunConfig, load_config
from sokhan.pipeline.stage import sha256_file, write_json

# One thread: the tests' shapes are tiny, and on a shared 2-core machine a second intra-op thread spins for far
# longer than the work takes (100x slower steps measured). Subprocesses get the same through OMP_NUM_THREADS.
torch.set_num_threads(1)
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SOKHAN_PROGRESS": "0"}

WORDS = {
    "fa": "من تو او ما کتاب خانه آب نان خوب بزرگ رفت آمد خورد دید را به از در با این آن است بود".split(),
    "zh": "我 你 他 我们 喜欢 学习 中文 书 水 吃 看 去 来 大 好 的 了 在 是 和 这 那 学校 老师".split(),
    "en": "i you he we book house water bread good big went came ate saw the a to of in with this that is was".split(),
}

# Small enough to train in a couple of seconds; the tests override what they need with --set style lists.
TINY_OVERRIDES = [
    "model.arch=transformer", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=64",
    "train.steps=6", "train.batch_size=4", "train.seq_len=16", "train.warmup_steps=2", "train.eval_every=3",
    "train.eval_batches=2", "train.ckpt_every=2", "train.keep_last=2", "train.lr=0.01", "train.min_lr=0.001",
    "train.device=cpu",
]


def _sentences(lang: str, n: int, rng: np.random.Generator) -> list[list[str]]:
    """``n`` sentences from a sparse random Markov chain over the language's words (each word has 3 successors)."""
    words = WORDS[lang]
    succ = rng.integers(0, len(words), size=(len(words), 3))
    out = []
    for _ in range(n):
        w = int(rng.integers(len(words)))
        sent = [words[w]]
        for _ in range(int(rng.integers(4, 10))):
            w = int(succ[w, rng.integers(3)])
            sent.append(words[w])
        out.append(sent)
    return out


def _pieces(lang: str, sentence: list[str]) -> list[str]:
    if lang == "zh":
        return sentence
    return [sentence[0]] + [" " + w for w in sentence[1:]]


def make_tiny_run(run_dir: Path, lines_per_lang: int = 300, val_lines: int = 40, seed: int = 0) -> Path:
    """Write ``run_dir/tokenize/`` (tokenizer, segmenter, train.bin, val.bin, meta.json, manifest.json)."""
    from sokhan.tokenization import Tokenizer

    rng = np.random.default_rng(seed)
    corpus = {lang: [_pieces(lang, s) for s in _sentences(lang, lines_per_lang + val_lines, rng)] for lang in WORDS}
    tok = Tokenizer.train(iter([p for lines in corpus.values() for p in lines]), vocab_size=600, min_frequency=2)
    out = Path(run_dir) / "tokenize"
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    special = tok.special_tokens
    tokens: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    shards: dict[str, list[int]] = {"train": [], "val": []}
    for lang, lines in corpus.items():
        for split, part in (("train", lines[:lines_per_lang]), ("val", lines[lines_per_lang:])):
            ids = []
            for encoded in tok.encode_pieces(part):
                ids += [special[f"<|lang:{lang}|>"], *encoded, special["<|eos|>"]]
            shards[split] += ids
            tokens[split][lang] = len(ids)
    for split, ids in shards.items():
        np.asarray(ids, dtype=np.uint16).tofile(out / f"{split}.bin")
    write_json(out / "meta.json", {"dtype": "uint16", "vocab_size": tok.vocab_size, "special_tokens": special,
                                   "tokens": tokens, "split_seed": seed})
    # The manifest the tokenize stage would write: downstream fingerprints read its outputs.
    outputs = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file()}
    write_json(out / "manifest.json", {"stage": "tokenize", "outputs": outputs, "metrics": {}})
    return Path(run_dir)


def tiny_config(*overrides: str) -> RunConfig:
    return load_config(None, [*TINY_OVERRIDES, *overrides])
