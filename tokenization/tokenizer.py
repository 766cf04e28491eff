"""The sokhan tokenizer: normalize, segment by language, then a byte-level subword model (HF ``tokenizers``).

Files: ``tokenizer.json`` is a plain HF tokenizers file (``tokenizers.Tokenizer.from_file`` loads it unchanged):
a Unigram or BPE model over GPT-2's byte alphabet, a ``ByteLevel`` pre-tokenizer without regex splitting and a
``ByteLevel`` decoder. The default model, pruned BPE (``sokhan.tokenization.prune``), is stored as a Unigram model
whose search finds the fewest tokens; ``model="bpe"`` stores HF's BPE with its merges. The language-aware
pre-tokenization (hazm words for Persian, word-character runs or jieba words for Chinese:
``sokhan.tokenization.segment``) cannot live in that file, so it runs in Python before the model sees the text,
and its settings, with the normalization options, are in ``segmenter.json`` beside it. A plain HF
``encode(pieces, is_pretokenized=True)`` of our ``pretokenize`` pieces gives our ids. Decoding any ids, one alone
included, never fails: bytes that are not (yet) whole UTF-8 characters come out as U+FFFD.

Lossless by construction: the segmentation keeps every character, every byte is in the vocabulary (no unknown
token), and special-token strings in user text are encoded as ordinary text (``encode_special_tokens``, set on
load: the HF file does not store it; and inside the model no merge makes a special token, no Unigram path takes
one), so ``decode(encode(t)) == normalize(t)`` for every ``t``.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Literal

from sokhan import SokhanError
from sokhan.tokenization.langid import LANGUAGES, detect_language
from sokhan.tokenization.normalize import normalize
from sokhan.tokenization.segment import SegmenterConfig, may_grow, pretokenize, segment

if TYPE_CHECKING:  # for annotations only
    from collections import Counter

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD) + tuple(f"<|lang:{lang}|>" for lang in LANGUAGES)
SEGMENTER_FILE = "segmenter.json"
TOKENIZER_FILE = "tokenizer.json"
SEGMENTER_FORMAT = "sokhan-segmenter/1"
_CHUNK = 512  # new pieces per model call
_CACHE_SIZE = 1 << 20  # pieces whose ids are remembered; real corpora have a few hundred thousand distinct ones


def lang_token(lang: str) -> str:
    return f"<|lang:{lang}|>"


class Tokenizer:
    """Text -> ids and back. Build with ``train`` or ``load``; ``save`` writes both files."""

    def __init__(self, hf, normalization: dict, segmenter: SegmenterConfig) -> None:
        self.hf = hf  # tokenizers.Tokenizer
        # User text containing "<|eos|>" must not turn into the special id: encode it as text.
        self.hf.encode_special_tokens = True
        self.normalization = dict(normalization)  # keyword arguments of normalize(): digits, remove_diacritics
        self.segmenter = segmenter
        vocab = hf.get_vocab(with_added_tokens=True)
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise SokhanError(f"tokenizer: special token {missing[0]!r} is not in the vocabulary")
        self._special = {t: vocab[t] for t in SPECIAL_TOKENS}
        self._cache: dict[str, list[int]] = {}  # piece -> ids (see encode_pieces)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def bos_id(self) -> int:
        return self._special[BOS]

    @property
    def eos_id(self) -> int:
        return self._special[EOS]

    @property
    def pad_id(self) -> int:
        return self._special[PAD]

    def lang_id(self, lang: str) -> int:
        try:
            return self._special[lang_token(lang)]
        except KeyError:
            raise SokhanError(f"language {lang!r} has no token (languages: {', '.join(LANGUAGES)})") from None

    def normalize(self, text: str, lang: str | None = None) -> str:
        """``text`` normalized the way ``encode`` does it (same options as the corpus)."""
        lang = lang or detect_language(text) or "en"
        return normalize(text, lang, **self.normalization)

    def segment(self, text: str, lang: str) -> list[str]:
        """Words of already-normalized ``text`` (jieba for zh, hazm for fa, word/punctuation runs otherwise)."""
        return segment(text, lang, self.segmenter)

    def word_may_grow(self, text: str, lang: str) -> bool:
        """Whether text appended to normalized ``text`` could lengthen its first word (Chinese: see ``may_grow``)."""
        return may_grow(text, lang)

    def pretokenize(self, text: str, lang: str) -> list[str]:
        """Pieces of already-normalized ``text`` for the model, which never merges across them.

        The words of ``segment``, except Chinese with ``zh_pretokenize = "runs"``, where a piece is a run of word
        characters and tokens may span words (see ``sokhan.tokenization.segment``).
        """
        return pretokenize(text, lang, self.segmenter)

    def encode(self, text: str, lang: str | None = None, add_special_tokens: bool = False) -> list[int]:
        """Ids of ``text``: normalized and segmented as language ``lang`` (None: detected by script, else ``en``).

        With ``add_special_tokens`` the ids are framed as in the token shards: ``<|lang:xx|>`` ids ``<|eos|>``.
        """
        lang = lang or detect_language(text) or "en"
        return self.encode_normalized(normalize(text, lang, **self.normalization), lang, add_special_tokens)

    def encode_normalized(self, text: str, lang: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of text that is already normalized (``RUN/normalize`` lines): pre-tokenization and the model only."""
        ids = self.encode_pieces([self.pretokenize(text, lang)])[0]
        return [self.lang_id(lang), *ids, self.eos_id] if add_special_tokens else ids

    def encode_pieces(self, batch: list[list[str]]) -> list[list[int]]:
        """Ids of pre-tokenized texts (``pretokenize``): the same as HF ``encode(pieces, is_pretokenized=True)``, piece by piece.

        Pieces are pre-tokens the model never merges across, so a piece always has the same ids: they are
        cached, and only pieces not seen before go to the model (in one batch, on Rust threads). Real text is
        Zipfian, so after a few thousand lines nearly every piece is a dictionary lookup.
        """
        cache = self._cache
        distinct = dict.fromkeys(itertools.chain.from_iterable(batch))
        new = [p for p in distinct if p not in cache]
        if len(cache) + len(new) > _CACHE_SIZE:
            cache.clear()  # then this batch's pieces are all new
            new = list(distinct)
        if new:
            chunks = [new[i : i + _CHUNK] for i in range(0, len(new), _CHUNK)]
            if len(chunks) == 1:  # one call on this thread; a thread pool costs more than it saves here
                encoded = [self.hf.encode(chunks[0], is_pretokenized=True, add_special_tokens=False)]
            else:
                encoded = self.hf.encode_batch(chunks, is_pretokenized=True, add_special_tokens=False)
            for chunk, enc in zip(chunks, encoded):
                # word_ids maps each token to its pre-token (piece) in the chunk.
                per_piece: list[list[int]] = [[] for _ in chunk]
                for token_id, word in zip(enc.ids, enc.word_ids):
                    per_piece[word].append(token_id)
                cache.update(zip(chunk, per_piece))
        return [[i for p in pieces for i in cache[p]] for pieces in batch]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids``; special tokens are left out unless ``skip_special_tokens`` is False.

        Never fails: bytes that are not whole UTF-8 characters (a single byte-level token often is one) decode to
        U+FFFD, ids outside the vocabulary to nothing.
        """
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (special tokens: their UTF-8 name)."""
        tok = self.hf.id_to_token(token_id)
        if tok is None:
            raise SokhanError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        if tok in self._special:
            return tok.encode()
        return bytes(_BYTE_OF[c] for c in tok)

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` and ``segmenter.json`` into ``directory``; returns the tokenizer.json path."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _atomic_write(d / TOKENIZER_FILE, self.hf.to_str(pretty=True))
        sidecar = {
            "format": SEGMENTER_FORMAT,
            "languages": list(LANGUAGES),
            "normalize": self.normalization,
            "segment": self.segmenter.to_dict(),
            "versions": _segmenter_versions(),
        }
        _atomic_write(d / SEGMENTER_FILE, json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n")
        return d / TOKENIZER_FILE

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """From a ``tokenizer.json`` (or the folder holding it) with ``segmenter.json`` beside it."""
        from tokenizers import Tokenizer as HFTokenizer

        p = Path(path)
        if p.is_dir():
            p = p / TOKENIZER_FILE
        side = p.with_name(SEGMENTER_FILE)
        for f in (p, side):
            if not f.is_file():
                raise SokhanError(f"{f}: no such file (a sokhan tokenizer is tokenizer.json + segmenter.json)")
        try:
            hf = HFTokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception for a bad file
            raise SokhanError(f"{p}: not a tokenizers file ({e})") from None
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
            if meta.get("format") != SEGMENTER_FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {SEGMENTER_FORMAT!r}")
            # Files written before zh_pretokenize existed were trained on jieba's words.
            seg = SegmenterConfig(**{"zh_pretokenize": "jieba", **meta["segment"]})
            normalization = {"digits": meta["normalize"]["digits"], "remove_diacritics": meta["normalize"]["remove_diacritics"]}
        except (ValueError, KeyError, TypeError, SokhanError) as e:
            raise SokhanError(f"{side}: not a sokhan segmenter file ({e})") from None
        _check_segmenter_versions(side, meta.get("versions") or {})
        return cls(hf, normalization, seg)

    @classmethod
    def train(
        cls,
        pieces: Iterable[list[str]],
        vocab_size: int,
        model: Literal["pruned-bpe", "bpe", "unigram"] = "pruned-bpe",
        min_frequency: int = 2,
        normalization: dict | None = None,
        segmenter: SegmenterConfig = SegmenterConfig(),
        length: int | None = None,
    ) -> "Tokenizer":
        """Train on ``pieces``: lines of pre-tokenized text (``pretokenize``; each piece one pre-token, tokens stay
        inside it). A line that should count twice is simply given twice (``weighted_lines`` in the tokenize stage).

        ``model``: ``pruned-bpe`` (byte-level BPE candidates pruned to ``vocab_size``, encoded into the fewest
        tokens: ``sokhan.tokenization.prune``), ``bpe`` (HF byte-level BPE as trained, encoded by its merges) or
        ``unigram`` (HF's Unigram trainer over the byte alphabet). ``normalization``: the options of ``normalize``
        the text was cleaned with (stored for ``encode``).
        """
        from collections import Counter

        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        from sokhan.tokenization import prune

        alphabet = pre_tokenizers.ByteLevel.alphabet()
        counts: Counter = Counter()
        if model in ("bpe", "pruned-bpe"):
            hf = HFTokenizer(models.BPE())
            size = vocab_size + (prune.extra_candidates(vocab_size) if model == "pruned-bpe" else 0)
            trainer = trainers.BpeTrainer(
                vocab_size=size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
                initial_alphabet=alphabet, show_progress=False,
            )
            if model == "pruned-bpe":
                pieces = _counting(pieces, counts)  # pruning measures token usage on the same pieces
        elif model == "unigram":
            hf = HFTokenizer(models.Unigram())
            trainer = trainers.UnigramTrainer(
                vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet,
                show_progress=False, max_piece_length=16,
            )
        else:
            raise SokhanError(f"tokenize.model = {model!r} must be 'pruned-bpe', 'bpe' or 'unigram'")
        # Each piece is one pre-token: no regex splitting, no prefix space; bytes map to GPT-2's printable alphabet.
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
        hf.train_from_iterator(pieces, trainer=trainer, length=length)
        if model != "bpe":
            learned = hf.get_vocab(with_added_tokens=False)
            candidates = [t for t, _ in sorted(learned.items(), key=lambda kv: kv[1]) if t not in SPECIAL_TOKENS]
            if model == "pruned-bpe":
                prune.prune(hf, candidates, set(alphabet), list(SPECIAL_TOKENS), counts, vocab_size)
            else:
                # HF's trainer scores the special tokens 0, above any real path: a piece spelling "<|eos|>" would
                # become the special id and vanish on decode. Same tokens and scores, specials never chosen.
                scores = _unigram_scores(hf)
                hf.model = models.Unigram(
                    [(t, prune.SPECIAL_SCORE) for t in SPECIAL_TOKENS] + [(t, scores[t]) for t in candidates], None, False
                )
        return cls(hf, normalization or {"digits": "persian", "remove_diacritics": True}, segmenter)


def _counting(pieces: Iterable[list[str]], counts: "Counter") -> Iterator[list[str]]:
    """``pieces`` unchanged, counting every piece into ``counts`` on the way (one pass over a generator)."""
    for line in pieces:
        counts.update(line)
        yield line


def _unigram_scores(hf) -> dict[str, float]:
    """token -> score of a trained HF Unigram model (read from its JSON, the only place HF exposes them)."""
    return {t: s for t, s in json.loads(hf.to_str())["model"]["vocab"]}


def _byte_table() -> dict[str, int]:
    """GPT-2's byte -> printable character map, inverted (the alphabet of byte-level tokens)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTE_OF = _byte_table()


def _segmenter_versions() -> dict[str, str | None]:
    """hazm and jieba versions: their dictionaries decide the segmentation, so a changed one changes the ids."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for pkg in ("hazm", "jieba", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


_WARNED: set[Path] = set()  # segmenter files whose version difference was said (once per process)


def _check_segmenter_versions(side: Path, recorded: dict) -> None:
    """One line on stderr when hazm or jieba differ from the versions the tokenizer was trained with: their rules
    and dictionaries cut the text into the pieces the ids were learned on, and nothing else would show that a
    deployment's Persian or Chinese is now cut differently (the bundle README's install pins nothing)."""
    import sys

    now = _segmenter_versions()
    changed = [f"{pkg} {recorded[pkg]} (here {now[pkg]})" for pkg in ("hazm", "jieba")
               if recorded.get(pkg) and now.get(pkg) and recorded[pkg] != now[pkg]]
    if changed and side not in _WARNED:
        _WARNED.add(side)
        print(f"sokhan: {side}: trained with {', '.join(changed)}; text may be segmented differently than in "
              "training, which costs accuracy (install the versions it names)", file=sys.stderr)


def _atomic_write(path: Path, text: str) -> None:
    """Through a temporary sibling and a rename, so a reader never sees half a file (nor a stray temporary when
    the write fails)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
