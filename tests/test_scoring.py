"""Sliding-window scoring, the bits-per-character arithmetic and next-word accuracy's plumbing."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from sokhan.pipeline import scoring
from sokhan.tokenization import SegmenterConfig, Tokenizer, segment

LINES = {
    "en": ["the cat sat on the mat .", "a dog ran in the park", "the cat ran to the dog"],
    "fa": ["در جنگل یک شیر درنده را دیدم", "کتاب‌ها را خواندم", "شیر در جنگل بود"],
}


def split(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A throwaway byte-level BPE trained in-process on the lines above."""
    return make_tokenizer(LINES)


def make_tokenizer(lines: dict[str, list[str]], vocab_size: int = 320) -> Tokenizer:
    """A throwaway byte-level BPE trained in-process on ``lines`` (per language)."""
    pieces = [p for lang, ls in lines.items() for line in ls for p in segment(line, lang)]
    return Tokenizer.train(iter([pieces * 3]), vocab_size=vocab_size, min_frequency=2, segmenter=SegmenterConfig(), model="bpe")


class ConvLM(nn.Module):
    """A causal model that sees exactly the last ``width`` tokens: windowed scoring must reproduce it exactly."""

    def __init__(self, vocab: int, width: int = 3, dim: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        self.conv = nn.Conv1d(dim, dim, width, padding=width - 1)
        self.out = nn.Linear(dim, vocab)

    def forward(self, ids):  # (B, L) -> (B, L, V)
        x = self.emb(ids).transpose(1, 2)  # (B, dim, L)
        x = self.conv(x)[:, :, : ids.shape[1]]  # causal: drop the right padding
        return self.out(torch.tanh(x.transpose(1, 2)))


@pytest.mark.parametrize("n,window,stride", [(1, 8, 4), (2, 8, 4), (7, 8, 4), (100, 16, 5), (64, 16, 16), (65, 16, 1),
                                             (10, 2, 1), (10, 2, 2)])
def test_windows_cover_each_target_once(n, window, stride):
    seen = []
    for i, (start, end, first) in enumerate(scoring.windows(n, window, stride)):
        assert end - start <= window
        assert start < first <= end
        if i > 0:
            assert first - start >= window - stride  # every scored target has this much context
        seen += range(first, end)
    assert seen == list(range(1, n))
    with pytest.raises(ValueError):
        scoring.windows(10, 4, 5)
    with pytest.raises(ValueError, match="window = 1 must be ≥ 2"):  # it looped forever, growing the list
        scoring.windows(10, 1, 1)


def test_windowed_scores_equal_full_context():
    V, n = 23, 131
    model = ConvLM(V).eval()
    tokens = np.random.default_rng(0).integers(V, size=n)
    nll, rank = scoring.score_windows(model, tokens, window=16, stride=6, batch_size=3)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.as_tensor(tokens)[None])[0].double(), -1).numpy()  # (n, V)
    want = -logp[np.arange(n - 1), tokens[1:]]
    np.testing.assert_allclose(nll, want, rtol=0, atol=1e-5)
    want_rank = np.array([(logp[p - 1] > logp[p - 1, tokens[p]]).sum() for p in range(1, n)]).clip(max=5)
    # Equal only where no other logit is within float32 noise of the target's.
    assert (rank == want_rank).mean() > 0.98


class OnDevice(torch.Tensor):
    """Logits as a GPU model returns them: ``numpy()`` refuses (as on a CUDA tensor) until ``cpu()`` is called."""

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first")

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor)


def test_windowed_scores_bring_a_gpu_models_logits_back():
    """evaluate.device = cuda: the scores were read with .numpy() off the GPU (TypeError). No GPU here, so a
    tensor that refuses .numpy() as a CUDA one does stands in."""
    V, n = 23, 40
    model = ConvLM(V).eval()
    tokens = np.random.default_rng(1).integers(V, size=n)
    want = scoring.score_windows(model, tokens, window=16, stride=6, batch_size=3)
    got = scoring.score_windows(lambda ids: model(ids).as_subclass(OnDevice), tokens, window=16, stride=6, batch_size=3)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_summarize_arithmetic(tokenizer):
    text = scoring.encode_lines(tokenizer, LINES["en"], "en", split=split)
    k = len(text.targets)
    nll = np.full(k, math.log(2.0))  # one bit per token
    rank = np.arange(k) % 7
    s = scoring.summarize(text, nll, rank)
    assert s.tokens == k
    assert s.characters == sum(len(x) for x in LINES["en"]) + 3
    assert s.words == 18  # 6 + 6 + 6; the "." is not a word
    assert s.bits_per_character == pytest.approx(k / s.characters)
    assert s.perplexity == pytest.approx(2.0)
    assert s.top1 == pytest.approx(np.mean(rank == 0)) and s.top5 == pytest.approx(np.mean(rank < 5))


def test_encode_lines_frames_like_the_shards(tokenizer):
    text = scoring.encode_lines(tokenizer, LINES["fa"], "fa", split=split)
    tag, eos = tokenizer.special_tokens["<|lang:fa|>"], tokenizer.special_tokens["<|eos|>"]
    for i, line in enumerate(LINES["fa"]):
        a, b = text.line_starts[i], text.line_starts[i + 1]
        assert text.tokens[a] == tag and text.tokens[b - 1] == eos
        assert tokenizer.decode(text.tokens[a + 1 : b - 1].tolist()) == line
    assert set(text.targets.tolist()) == set(range(len(text.tokens))) - set(text.line_starts[:-1].tolist())
    small = scoring.encode_lines(tokenizer, LINES["fa"], "fa", max_tokens=len(text.targets) - 1, split=split)
    assert small.lines == LINES["fa"][:2]  # whole lines only


def test_word_starts_find_every_word(tokenizer):
    text = scoring.encode_lines(tokenizer, LINES["fa"] + LINES["en"][:1], "fa", split=split)
    starts = scoring.word_starts(tokenizer, text, limit=1000, split=split)
    words = [w for line in text.lines for w in split(line) if scoring.is_word(w)]
    # A word whose first token also carries the previous word's end cannot be reached; BPE here keeps them apart.
    assert [w for _, w in starts] == words
    for pos, word in starts:
        rest = tokenizer.decode(text.tokens[pos : text.line_starts[np.searchsorted(text.line_starts, pos, "right")] - 1].tolist())
        assert rest.lstrip().startswith(word)
    spread = scoring.word_starts(tokenizer, text, limit=4, split=split)
    assert len(spread) == 4 and spread[0] == starts[0] and spread[-1] == starts[-1]  # over all the text, not its start
    assert set(spread) <= set(starts)


class Oracle:
    """Next-word plumbing check: a 'model' that knows the stream and puts all its mass on the true next token.

    Its state is a batch: per row the tuple of tokens seen since the last reset; it finds where that history
    ends in the stream.
    """

    def __init__(self, tokens: np.ndarray, vocab: int, shift: int = 0):
        self.tokens, self.vocab, self.shift = tokens.tolist(), vocab, shift

    def init_state(self):
        return [()]

    def _logits(self, hist: tuple) -> np.ndarray:
        out = np.zeros(self.vocab, np.float32)
        m = min(len(hist), 6)
        for q in range(m - 1, len(self.tokens) - 1):
            if tuple(self.tokens[q - m + 1 : q + 1]) == hist[len(hist) - m :]:
                out[(self.tokens[q + 1] + self.shift) % self.vocab] = 30.0
                break
        return out

    def step(self, ids, state):
        hists = [h + (int(i),) for h, i in zip(state, ids, strict=True)]
        return np.stack([self._logits(h) for h in hists]), hists

    def advance(self, ids, state):
        (hist,) = state if state is not None else self.init_state()
        hist = hist + tuple(int(i) for i in ids)
        return self._logits(hist), [hist]

    def take(self, state, rows):
        return [state[r] for r in rows]

    def fns(self) -> scoring.ModelFns:
        return scoring.ModelFns(self.init_state, self.step, self.advance, self.take)


def test_nextword_ranks_with_an_oracle(tokenizer):
    text = scoring.encode_lines(tokenizer, LINES["en"] + LINES["en"][:1], "en", split=split)
    gold = scoring.word_starts(tokenizer, text, limit=100, split=split)
    V = tokenizer.vocab_size
    ranks = scoring.nextword_ranks(Oracle(text.tokens, V).fns(), tokenizer, text, gold, window=24, split=split)
    assert (ranks == 0).all()
    wrong = scoring.nextword_ranks(Oracle(text.tokens, V, shift=1).fns(), tokenizer, text, gold, window=24, split=split)
    assert (wrong == 0).mean() < 0.2


@pytest.mark.parametrize("arch", ["mamba", "transformer"])
def test_torch_fns_take_branches_without_touching_the_state(arch):
    """``take`` copies rows out (the search steps them in place); stepping a taken batch matches the full forward."""
    from sokhan.pipeline.models import ModelConfig, build

    cfg = ModelConfig(arch=arch, d_model=16, n_layers=1, vocab_size=11, max_seq_len=16).resolve()
    model = build(cfg).eval()
    fns = scoring.torch_fns(model)
    ids = np.array([1, 4, 2, 7])
    logits, state = fns.advance(ids, fns.init_state())
    before = [t.clone() for t in state.tensors()]
    a, _ = fns.step(np.array([3, 5]), fns.take(state, np.array([0, 0])))
    b, _ = fns.step(np.array([3]), fns.take(state, np.array([0])))
    for x, y in zip(before, state.tensors()):
        assert torch.equal(x, y)
    with torch.no_grad():
        full = model(torch.as_tensor(np.append(ids, 3))[None])[0]
        other = model(torch.as_tensor(np.append(ids, 5))[None])[0]
    # float32 against float32: the step and the parallel forward sum in different orders
    np.testing.assert_allclose(logits, full[3].numpy(), atol=1e-4)
    np.testing.assert_allclose(a[0], full[4].numpy(), atol=1e-4)
    np.testing.assert_allclose(a[1], other[4].numpy(), atol=1e-4)
    np.testing.assert_allclose(b[0], a[0], atol=1e-5)


def test_nextword_ranks_on_the_ngram(tokenizer):
    """The n-gram through ``ngram_fns``: counted on the very text it is asked about (often enough that discounting
    leaves it confident), a 5-gram knows every next word but the ambiguous ones; counted on other text, hardly any."""
    from sokhan.pipeline.ngram import KneserNey

    text = scoring.encode_lines(tokenizer, LINES["en"], "en", split=split)
    gold = scoring.word_starts(tokenizer, text, limit=100, split=split)
    V = tokenizer.vocab_size
    seen = scoring.ngram_fns(KneserNey(5, V).fit(np.tile(text.tokens, 20)))
    ranks = scoring.nextword_ranks(seen, tokenizer, text, gold, window=64, split=split)
    # "the cat" goes on with sat or ran. The text's first word has only the language tag before it, where
    # Kneser-Ney's lower order counts contexts, not occurrences: any first word of a line is as likely.
    assert (ranks == 0).mean() > 0.8 and (ranks[1:] < 2).all()
    other = scoring.encode_lines(tokenizer, LINES["fa"], "fa", split=split)
    unseen = scoring.ngram_fns(KneserNey(5, V).fit(np.tile(other.tokens, 20)))
    assert (scoring.nextword_ranks(unseen, tokenizer, text, gold, window=64, split=split) == 0).mean() < 0.2
    logits, state = seen.advance(text.tokens[:3], None)
    assert logits.shape == (V,) and np.exp(logits).sum() == pytest.approx(1.0)
    assert seen.take(state, np.array([0, 0])) == [state[0], state[0]] and len(state[0]) == 3
