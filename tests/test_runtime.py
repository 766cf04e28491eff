"""The torch-free runtime: generation, next-word prediction, the CLI, and one-line errors for bad bundles."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sokhan import SokhanError
from sokhan.export.nextword import INVALID, first_word, next_words
from sokhan.export.runtime import CacheLoop, Decoder, StepLoop
from tiny_bundle import FULL, tiny_bundle

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle() -> Path:
    return tiny_bundle("transformer")


@pytest.fixture(scope="module")
def decoder(bundle) -> Decoder:
    return Decoder(bundle, provider="cpu")


@pytest.mark.parametrize("arch", ["transformer", "mamba"])
def test_greedy_generation_is_the_torch_greedy_continuation(arch):
    """Through generate's in-place loops: CacheLoop (transformer) and StepLoop (Mamba)."""
    import torch

    from sokhan.pipeline.train.checkpoint import load_model
    from tiny_bundle import tiny_run

    decoder = Decoder(tiny_bundle(arch), provider="cpu")
    model, _ = load_model(tiny_run(arch) / "train")
    ids = decoder.encode_prompt("i saw the book", "en")
    assert ids[0] == decoder.tokenizer.lang_id("en")
    banned = [i for i in decoder.tokenizer.special_tokens.values() if i != decoder.eos]  # never generated
    with torch.no_grad():
        logits, state = model.prefill(torch.tensor([ids]))
        want = []
        nxt = int(logits[0, -1].index_fill(0, torch.tensor(banned), -torch.inf).argmax())
        for _ in range(10):
            if nxt == decoder.eos:
                break
            want.append(nxt)
            logits, state = model.step(torch.tensor([nxt]), state)
            nxt = int(logits[0].index_fill(0, torch.tensor(banned), -torch.inf).argmax())
    got = decoder.generate("i saw the book", max_new_tokens=len(want), lang="en")
    assert got == decoder.tokenizer.decode(want)


def test_generate_never_emits_a_language_tag_bos_or_pad(decoder, monkeypatch):
    """Sampling could pick them (then fed back, then left out of the text without a word); only <|eos|> may end."""
    import sokhan.export.runtime as runtime

    seen = []
    real = runtime.sample

    def spy(logits, *args):
        seen.append(logits.copy())
        return real(logits, *args)

    monkeypatch.setattr(runtime, "sample", spy)
    decoder.generate("the book", 4, temperature=1.0, seed=0, lang="en")
    specials = decoder.tokenizer.special_tokens
    banned = [i for name, i in specials.items() if name != "<|eos|>"]
    assert seen and banned and all(np.isneginf(x[:, banned]).all() and np.isfinite(x[:, specials["<|eos|>"]]).all() for x in seen)


def test_step_loop_is_the_step_api_in_place():
    """StepLoop (generate's loop for a fixed-size state) gives the step API's logits and state bit for bit."""
    dec = Decoder(tiny_bundle("mamba"), provider="cpu")
    _, state = dec.prefill(dec.encode_prompt("we saw the house", "en"), batch_size=2)
    # The loop takes its state over (overwrites it), so it gets a copy of the one the step API carries on from.
    loop = StepLoop(dec.graph, dec.graph.state_from_numpy([t.numpy() for t in state.tensors], state.position))
    for row in ([5, 9], [17, 17], [3, 8], [9, 5]):
        want, state = dec.step(np.array(row), state)
        np.testing.assert_array_equal(loop.step(np.array(row)), want)
    snapshot = loop.state()
    assert snapshot.position == state.position and snapshot.batch_size == 2
    kept = [t.numpy().copy() for t in snapshot.tensors]
    for a, b in zip(kept, state.tensors):
        np.testing.assert_array_equal(a, b.numpy())
    loop.step(np.array([1, 1]))  # a snapshot is a copy: later steps leave it alone
    for a, b in zip(kept, snapshot.tensors):
        np.testing.assert_array_equal(a, b.numpy())


def test_step_loop_refuses_a_kv_cache(decoder):
    with pytest.raises(SokhanError, match="KV cache"):
        StepLoop(decoder.graph, decoder.init_state(1))


@pytest.mark.parametrize("graph", ["decoder.onnx", "decoder.fp16.onnx", "decoder.int8.onnx"])
def test_cache_loop_is_the_step_api_in_place(graph):
    """CacheLoop (the KV cache appended in place) gives the step API's logits and cache, for every variant."""
    dec = Decoder(tiny_bundle("transformer", *FULL), provider="cpu", graph=graph)
    assert dec.config["kv_share_buffer"]
    _, state = dec.prefill(dec.encode_prompt("we saw the house", "en"), batch_size=2)
    loop = CacheLoop(dec.graph, state, capacity=state.position + 5)
    for row in ([5, 9], [17, 17], [3, 8], [9, 5]):
        want, state = dec.step(np.array(row), state)
        np.testing.assert_allclose(loop.step(np.array(row)), want, atol=1e-5, rtol=0)
    snapshot = loop.state()
    assert snapshot.position == state.position and snapshot.batch_size == 2
    for a, b in zip(snapshot.tensors, state.tensors):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6, rtol=0)
    loop.step(np.array([1, 1]))  # the fifth entry: the cache is full
    with pytest.raises(SokhanError, match="all are used"):
        loop.step(np.array([1, 1]))


@pytest.mark.parametrize("arch", ["transformer", "mamba"])
def test_fp16_variant_keeps_its_state_in_float16(arch):
    """No casts of the state at the graph's edges (a KV cache appended in place), and generate is its greedy path."""
    dec = Decoder(tiny_bundle(arch, "export.precision=fp16"), provider="cpu", graph="decoder.fp16.onnx")
    assert {s.dtype for s in dec.specs} == {"float16"}
    prompt = dec.encode_prompt("we saw the house", "en")
    logits, state = dec.prefill(prompt)
    assert logits.dtype == np.float32 and {t.data_type() for t in state.tensors} == {"tensor(float16)"}
    want = []
    for _ in range(6):
        token = int(logits[0].argmax())
        if token == dec.eos:
            break
        want.append(token)
        logits, state = dec.step(np.array([token]), state)
    assert dec.generate("we saw the house", max_new_tokens=len(want), lang="en") == dec.tokenizer.decode(want)


def test_cache_loop_refuses_a_recurrent_state():
    dec = Decoder(tiny_bundle("mamba"), provider="cpu")
    with pytest.raises(SokhanError, match="no KV cache"):
        CacheLoop(dec.graph, dec.init_state(1), capacity=4)


def test_sampling_is_seeded_and_top_k_1_is_greedy(decoder):
    a = decoder.generate("我 喜欢", max_new_tokens=12, temperature=1.0, seed=7)
    b = decoder.generate("我 喜欢", max_new_tokens=12, temperature=1.0, seed=7)
    assert a == b
    assert decoder.generate("我 喜欢", 12, temperature=0.8, top_k=1, seed=3) == decoder.generate("我 喜欢", 12)


def test_a_temperature_near_zero_is_greedy(decoder):
    """1e-310 overflowed logits / temperature to inf, and inf - inf made nan probabilities (a numpy traceback)."""
    greedy = decoder.generate("我 喜欢", 6)
    assert decoder.generate("我 喜欢", 6, temperature=1e-310, seed=0) == greedy
    assert decoder.generate("我 喜欢", 6, temperature=5e-324, seed=0) == greedy


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"max_new_tokens": 2.5}, "max_new_tokens = 2.5 must be an integer >= 0"),
        ({"max_new_tokens": None}, "max_new_tokens = None must be an integer >= 0"),
        ({"max_new_tokens": True}, "max_new_tokens = True must be an integer >= 0"),
        ({"top_k": 2.5}, "top_k = 2.5 must be an integer >= 1 or None"),
        ({"top_k": 0}, "top_k = 0 must be an integer >= 1 or None"),
        ({"seed": 1.5}, "seed = 1.5 must be an integer >= 0 or None"),
        ({"temperature": "0.5"}, "temperature = '0.5' must be a finite number >= 0"),
        ({"temperature": float("inf")}, "temperature = inf must be a finite number >= 0"),
    ],
)
def test_generation_arguments_of_the_wrong_type_are_named(decoder, kwargs, message):
    """numpy's own TypeErrors (`Partition index must be integer`) named no parameter; True counted as 1."""
    with pytest.raises(SokhanError, match=re.escape(message)):
        decoder.generate("i saw", **{"max_new_tokens": 2, **kwargs})
    assert decoder.generate("i saw", max_new_tokens=np.int64(2), top_k=np.int32(3), seed=np.uint8(1), temperature=np.float32(1)) is not None
    with pytest.raises(SokhanError, match=re.escape("k = 1.0 must be an integer >= 1")):
        decoder.next_words("i saw", k=1.0)


def test_prefill_graph_and_stepping_agree():
    stepped = Decoder(tiny_bundle("transformer"), provider="cpu")
    fused = Decoder(tiny_bundle("transformer", *FULL), provider="cpu")
    assert fused.prefill_session is not None and stepped.prefill_session is None
    ids = stepped.encode_prompt("you went to the house", "en")
    (la, sa), (lb, sb) = stepped.prefill(ids), fused.prefill(ids)
    np.testing.assert_allclose(la, lb, atol=1e-4, rtol=0)
    assert sa.position == sb.position == len(ids)
    assert fused.generate("you went to the house", 8) == stepped.generate("you went to the house", 8)


def test_batched_step_rows_are_independent(decoder):
    state = decoder.init_state(3)
    rows = np.array([5, 17, 5])
    logits, state = decoder.step(rows, state)
    logits, state = decoder.step(np.array([9, 9, 9]), state)
    np.testing.assert_allclose(logits[0], logits[2], atol=1e-6)
    assert not np.allclose(logits[0], logits[1])
    assert state.batch_size == 3 and state.position == 2


@pytest.mark.parametrize("arch", ["transformer", "mamba"])
@pytest.mark.parametrize("graph,atol", [("decoder.onnx", 1e-6), ("decoder.fp16.onnx", 1e-3)])
def test_a_row_decodes_the_same_alone_and_in_a_batch(arch, graph, atol):
    """The README says so of the float32 and float16 graphs (the int8 one shares activation scales across rows)."""
    dec = Decoder(tiny_bundle(arch, *FULL), provider="cpu", graph=graph)
    rows = np.array([[5, 9, 12, 7], [17, 3, 3, 8], [30, 11, 6, 2]])
    batched, alone = dec.init_state(3), dec.init_state(1)
    for t in range(rows.shape[1]):
        logits, batched = dec.step(rows[:, t], batched)
        single, alone = dec.step(rows[1:2, t], alone)
        np.testing.assert_allclose(logits[1], single[0], atol=atol, rtol=0)


def test_cuda_requested_without_cuda_is_one_line(bundle):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in Decoder(bundle, provider="auto").providers:
        pytest.skip("CUDA works here; the error path needs a machine without it")
    with pytest.raises(SokhanError, match="cuda") as e:
        Decoder(bundle, provider="cuda")
    assert "\n" not in str(e.value)
    assert "CUDAExecutionProvider" in ort.get_available_providers() or "no CUDA provider" in str(e.value)


def test_a_cuda_session_asks_for_full_float32_and_looks_for_the_cuda_libraries(bundle, monkeypatch, capsys):
    """No GPU here: what open_session asks ONNX Runtime for is checked instead. TF32 (ONNX Runtime's default on
    Ampere and later) put float32 logits 3e-3 off, past the export's 1e-4 parity check; without torch the CUDA
    libraries are found only if preload_dlls looks for them, and its complaints must not reach stdout."""
    import onnxruntime as ort

    from sokhan.export import runtime

    asked, real = [], ort.InferenceSession

    def session(path, sess_options=None, providers=None):
        asked.append(providers)
        return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(runtime, "_gpu_present", lambda: True)
    monkeypatch.setattr(ort, "preload_dlls", lambda: print("Failed to load libcublas.so.13"), raising=False)
    monkeypatch.setattr(runtime, "_PRELOADED", False)
    runtime.open_session(bundle / "decoder.onnx", provider="auto")
    assert asked == [[("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]]
    assert runtime._PRELOADED and "Failed to load" not in capsys.readouterr().out
    runtime.open_session(bundle / "decoder.onnx", provider="cpu")
    assert asked[-1] == ["CPUExecutionProvider"]
    # onnxruntime-gpu lists CUDA on a machine without a GPU too: auto takes the CPU there, and says nothing.
    monkeypatch.setattr(runtime, "_gpu_present", lambda: False)
    monkeypatch.setattr(runtime, "_NOTICED", False)
    capsys.readouterr()
    runtime.open_session(bundle / "decoder.onnx", provider="auto")
    assert asked[-1] == ["CPUExecutionProvider"] and "CUDA" not in capsys.readouterr().err


def test_float32_attention_on_a_gpu_is_named(bundle):
    """GroupQueryAttention has CUDA kernels in float16 only: a float32 or int8-cache transformer graph on a GPU
    runs its attention on the CPU. The notice names the graph to deploy; float16, CPU, Mamba: nothing to say."""
    from sokhan.export.runtime import StateSpec, cuda_notice

    config = {"kv_share_buffer": True}
    f32 = [StateSpec("past_key_values.0.key", "present.0.key", ("batch", 2, "past", 16), "float32")]
    f16 = [StateSpec("past_key_values.0.key", "present.0.key", ("batch", 2, "past", 16), "float16")]
    i8 = [StateSpec("past_key_values.0.key", "present.0.key", ("batch", 2, "past", 16), "int8")]
    assert "decoder.fp16.onnx" in cuda_notice(config, f32, "cuda", "decoder.onnx")
    assert cuda_notice(config, i8, "cuda", "decoder.int8.onnx").startswith("decoder.int8.onnx: its attention")
    assert cuda_notice(config, f16, "cuda", "decoder.fp16.onnx") is None
    assert cuda_notice(config, f32, "cpu", "decoder.onnx") is None
    assert cuda_notice({}, f32, "cuda", "decoder.onnx") is None  # Mamba, or written-out attention


def test_context_limit_is_a_clear_error(decoder):
    with pytest.raises(SokhanError, match="max_context"):
        decoder.prefill([5] * (decoder.max_context + 1))


def test_next_words_from_the_bundle(decoder):
    words = decoder.next_words("the book", k=3, lang="en")
    assert 1 <= len(words) <= 3
    probs = [p for _, p in words]
    assert probs == sorted(probs, reverse=True) and 0 < probs[0] <= 1 and sum(probs) <= 1 + 1e-9
    assert all(w and w == w.strip() and INVALID not in w for w, _ in words)


class CharTokenizer:
    """Token i is character ``ALPHABET[i]``; the last id is <|eos|>. Words split at spaces and punctuation."""

    ALPHABET = "ab ."
    special_tokens = {"<|eos|>": 4, "<|bos|>": 5}

    def decode(self, ids):
        return "".join(self.ALPHABET[i] for i in ids if i < 4)

    def segment(self, text, lang):
        import re

        return re.findall(r"\s*\w+|\s*[^\w\s]+|\s+", text)


def chain_model(tok, table: dict, end: int, vocab: int = 6):
    """A model whose next-token distribution is fixed by the text so far: ``table[text]`` ({token: p}), else
    ``end`` (<|eos|>) for sure. Returns logits_for(text) and a batched step whose state is the texts."""

    def logits_for(text):
        out = np.full(vocab, -1e9)
        for i, p in table.get(text, {end: 1.0}).items():
            out[i] = math.log(p)
        return out

    def step(ids, state):  # a batch: one text per row
        texts = [t + tok.decode([int(i)]) for t, i in zip(state, ids, strict=True)]
        return np.stack([logits_for(t) for t in texts]), texts

    return logits_for, step


def test_next_words_exact_probabilities_on_a_known_chain():
    """A model whose next-character distribution is fixed by the text so far: the word probabilities are known.

    After "": a 0.6, b 0.4. After "a": " " 0.5, "b" 0.5. After "ab": " " 1. After "b": "." 1 -> words a 0.3,
    ab 0.3, b 0.4. <|bos|> never comes out, and nothing past the beam is counted.
    """
    table = {"": {0: 0.6, 1: 0.4}, "a": {2: 0.5, 1: 0.5}, "ab": {2: 1.0}, "b": {3: 1.0}}
    tok = CharTokenizer()

    def logits_for(text):
        out = np.full(6, -1e9)
        for i, p in table.get(text, {4: 1.0}).items():
            out[i] = math.log(p)
        out[5] = 50.0 if text == "" else -1e9  # a special token the search must never take
        return out

    calls = []

    def step(ids, state):  # a batch: one text per row
        calls.append(len(ids))
        texts = [t + tok.decode([int(i)]) for t, i in zip(state, ids, strict=True)]
        return np.stack([logits_for(t) for t in texts]), texts

    def take(state, rows):
        return [state[r] for r in rows]

    got = dict(next_words(step, [""], logits_for(""), tok, take=take, k=5, beam=4, split=lambda t: tok.segment(t, "en")))
    got = {w.strip(): p for w, p in got.items()}
    assert set(got) == {"a", "ab", "b"}
    assert got["a"] == pytest.approx(0.3) and got["ab"] == pytest.approx(0.3) and got["b"] == pytest.approx(0.4)
    assert calls == [2, 1]  # one batched step per round: {"a", "b"}, then {"ab"}


def test_after_a_word_only_continuations_that_start_a_word_count():
    """A prompt ending inside a word ("...ab"): "b " would only finish it, as "ها" finishes "کتاب" or "ing" "weath".
    With ``after_word`` the search drops such continuations; " a" and "." remain (probabilities as without it)."""
    tok = CharTokenizer()
    table = {"": {1: 0.5, 2: 0.3, 3: 0.2}, "b": {2: 1.0}, " ": {0: 1.0}, " a": {2: 1.0}}
    logits_for, step = chain_model(tok, table, end=4)

    def search(after_word):
        found = next_words(step, [""], logits_for(""), tok, take=lambda s, rows: [s[r] for r in rows], k=5, beam=4,
                           split=lambda t: [p.strip() for p in tok.segment(t, "en") if p.strip()], after_word=after_word)
        return {w: pytest.approx(p) for w, p in found}

    assert search(False) == {"b": 0.5, "a": 0.3, ".": 0.2}
    assert search(True) == {"a": 0.3, ".": 0.2}


@pytest.mark.parametrize("text,lang,inside", [
    ("the weath", "en", True), ("the weather ", "en", False), ("کتاب", "fa", True), ("کتاب\u200c", "fa", True),
    ("سلام،", "fa", False), ("(", "en", False), ("北京是中国的", "zh", False), ("", "en", False), ("v2", "en", True),
])
def test_ends_inside_word(text, lang, inside):
    from sokhan.export.nextword import ends_inside_word

    assert ends_inside_word(text, lang) is inside


def test_next_words_stay_inside_the_context_limit(decoder):
    """A prompt a few tokens short of max_context: the search's own steps ran past it ("context of 1025 tokens
    exceeds the model's max_context = 1024") where generate stopped cleanly."""
    words = "the big house with the good book ".split()
    text = " ".join(words[i % len(words)] for i in range(2000))
    ids = decoder.encode_prompt(text, "en")
    cut = decoder.tokenizer.decode(ids[1:decoder.max_context - 2])  # about max_context - 3 tokens with the tag
    found = decoder.next_words(cut, k=3, lang="en")
    assert 1 <= len(found) <= 3
    # A prompt that fills the context: no word could be spelt, and the CLI said only "0 of 3 words found".
    full = decoder.encode_prompt(cut, "en")
    exact = Decoder(decoder.bundle, provider="cpu")
    exact.max_context = len(full)
    with pytest.raises(SokhanError, match=f"prompt of {len(full)} tokens fills the model's max_context = {len(full)}"):
        exact.next_words(cut, k=3, lang="en")


def test_first_word_boundaries():
    split = CharTokenizer().segment
    words = lambda t: [p.strip() for p in split(t, "en") if p.strip()]  # noqa: E731
    assert first_word(" ab", words, final=False) is None
    assert first_word(" ab ", words, final=False) == "ab"
    assert first_word(" ab.", words, final=False) == "ab"
    assert first_word(" ab", words, final=True) == "ab"
    assert first_word("ab\ufffd", words, final=False) is None  # inside a multi-byte character
    assert first_word("\ufffdb", words, final=False) == INVALID


def test_runtime_path_never_imports_torch(bundle):
    """Generation and prediction, from Python and through the CLI, in an interpreter where torch cannot load."""
    script = f"""
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, NoTorch())
from sokhan.export.runtime import Decoder, StepLoop
d = Decoder({str(bundle)!r}, provider="cpu")
assert d.generate("the book", 4, lang="en") is not None
assert d.next_words("我 喜欢", k=2)
from sokhan.pipeline.cli import main
assert main(["generate", "--bundle", {str(bundle)!r}, "--prompt", "the", "--max-new-tokens", "3", "--provider", "cpu"]) == 0
assert main(["predict", "--bundle", {str(bundle)!r}, "-k", "2", "--provider", "cpu", "کتاب"]) == 0
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
print("TORCH-FREE OK")
"""
    env = dict(os.environ, SOKHAN_PROGRESS="0")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "TORCH-FREE OK" in out.stdout


def test_cli_generate_and_predict(bundle, capsys):
    from sokhan.pipeline.cli import main

    assert main(["generate", "--bundle", str(bundle), "--prompt", "i saw", "--max-new-tokens", "5", "--provider", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("i saw")
    # The prompt is shown as the model read it: Arabic ي/ك as Persian ی/ک, no doubled space before the continuation.
    assert main(["generate", "--bundle", str(bundle), "--prompt", "علي كتاب ", "--max-new-tokens", "3", "--provider", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("علی کتاب")
    assert main(["predict", "--bundle", str(bundle), "-k", "2", "--provider", "cpu", "i saw the"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert 1 <= len(lines) <= 2 and all(float(line.split("\t")[0]) >= 0 for line in lines)
    # What printed nothing, or nothing different, without a word: --lang against the script, fewer words than -k,
    # sampling flags at temperature 0.
    assert main(["predict", "--bundle", str(bundle), "-k", "500", "--lang", "fa", "--provider", "cpu", "i saw the"]) == 0
    err = capsys.readouterr().err
    assert "--lang fa, but the text is mostly in Latin script" in err and "of 500 words found" in err
    assert main(["generate", "--bundle", str(bundle), "--prompt", "i saw", "--top-k", "3", "--max-new-tokens", "2",
                 "--provider", "cpu"]) == 0
    assert "at --temperature 0 (the default) decoding is greedy" in capsys.readouterr().err


def _broken(bundle: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    edit(copy)
    return copy


def _edit_config(key, value):
    def edit(d: Path):
        cfg = json.loads((d / "config.json").read_text())
        if callable(value):
            value(cfg)
        else:
            cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))

    return edit


def _rename_state(cfg):
    cfg["state"][0]["input"] = "past.0.k"


def _resize_state(cfg):
    cfg["state"][1]["shape"][3] = 17


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: (d / "decoder.onnx").unlink(), r"decoder\.onnx: missing ONNX graph"),
        (lambda d: (d / "config.json").unlink(), r"config\.json: missing"),
        (lambda d: (d / "segmenter.json").unlink(), r"segmenter\.json: missing"),
        (lambda d: (d / "decoder.onnx").write_bytes(b"\x08\x07not an onnx model" * 10), r"decoder\.onnx: ONNX Runtime cannot load"),
        (lambda d: (d / "config.json").write_text("{not json"), r"config\.json: not valid JSON"),
        (_edit_config("vocab_size", 123), r"vocab"),
        (_edit_config("state", _rename_state), r"graph inputs do not match config\.json: missing \['past\.0\.k'\]"),
        (_edit_config("uses_position_ids", False), r"unexpected \['position_ids'\]"),
        (_edit_config("state", _resize_state), r"input past_key_values\.0\.value has shape \['batch', 2, 'past', 16\]"),
        (_edit_config("format", "something-else"), r"not a sokhan bundle"),
    ],
    ids=["no-graph", "no-config", "no-segmenter", "corrupt-onnx", "bad-json", "vocab-mismatch", "input-names", "position-ids",
         "state-shape", "format"],
)
def test_bad_bundle_is_one_line(bundle, tmp_path, edit, message):
    broken = _broken(bundle, tmp_path, edit)
    with pytest.raises(SokhanError, match=message) as e:
        Decoder(broken, provider="cpu")
    assert "\n" not in str(e.value)


def test_a_tokenizer_or_graph_from_another_run_is_refused(bundle, tmp_path):
    """Two runs' tokenizers of one size passed every check, and a swapped one (or a swapped graph) made noise:
    config.json and each graph's metadata record the tokenizer files' sha256."""
    cfg = json.loads((bundle / "config.json").read_text())
    assert set(cfg["files"]) == {"tokenizer.json", "segmenter.json"}
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    # A rewritten file stands in for another run's tokenizer of the same size: the check compares bytes.
    (other / "tokenizer.json").write_text(json.dumps(json.loads((other / "tokenizer.json").read_text()), indent=1))
    with pytest.raises(SokhanError, match=r"tokenizer\.json: not the file this model was exported with") as e:
        Decoder(other, provider="cpu")
    assert "\n" not in str(e.value)

    # A graph exported with another tokenizer: its metadata records other files than this bundle's config.json.
    import onnx

    from sokhan.export.onnx import METADATA_KEY, write_metadata

    swapped = tmp_path / "swapped"
    shutil.copytree(bundle, swapped)
    meta = {p.key: p.value for p in onnx.load(str(swapped / "decoder.onnx")).metadata_props}
    graph_cfg = json.loads(meta[METADATA_KEY])
    graph_cfg["files"] = dict(graph_cfg["files"], **{"tokenizer.json": "0" * 64})
    write_metadata(swapped / "decoder.onnx", graph_cfg)
    with pytest.raises(SokhanError, match=r"decoder\.onnx: exported with another tokenizer than this bundle's"):
        Decoder(swapped, provider="cpu")
    # ... and one exported before graphs recorded them (every bundle made until then): from another bundle too.
    write_metadata(swapped / "decoder.onnx", {k: v for k, v in graph_cfg.items() if k != "files"})
    with pytest.raises(SokhanError, match=r"decoder\.onnx: exported with another tokenizer than this bundle's"):
        Decoder(swapped, provider="cpu")

    for bad in ("abc", ["x"], {"tokenizer.json": 5}):  # a hand-edited config: one line, not an AttributeError
        broken = tmp_path / f"bad{len(str(bad))}"
        shutil.copytree(bundle, broken)
        _edit_config("files", bad)(broken)
        with pytest.raises(SokhanError, match=r"config\.json: key 'files' must map file names to sha256 digests"):
            Decoder(broken, provider="cpu")

    # A bundle exported before the digests were recorded still opens.
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    _edit_config("files", None)(old)
    Decoder(old, provider="cpu")


def test_bad_bundle_through_the_cli_exits_2(bundle, tmp_path, capsys):
    from sokhan.pipeline.cli import main

    broken = _broken(bundle, tmp_path, lambda d: (d / "decoder.onnx").write_bytes(b"garbage"))
    assert main(["predict", "--bundle", str(broken), "--provider", "cpu", "hello"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sokhan: error:") and "decoder.onnx" in err[0]


def test_bad_state_dtype_in_config_is_one_line(bundle, tmp_path):
    def float64(cfg):
        cfg["state"][0]["dtype"] = "float64"

    broken = _broken(bundle, tmp_path, _edit_config("state", float64))
    with pytest.raises(SokhanError, match=r"config\.json: state past_key_values\.0\.key has dtype 'float64'") as e:
        Decoder(broken, provider="cpu")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate", "--prompt", ""], "empty prompt '': give at least one character"),
        (["predict", "   "], "empty prompt '   ': give at least one character"),
        # A byte that is not UTF-8 comes into argv as a lone surrogate; it was dropped without a word.
        (["predict", "i saw \udcff"], "the text is not valid UTF-8 (at character 7)"),
        (["generate", "--prompt", "\udcfe\udcff"], "--prompt is not valid UTF-8 (at character 1)"),
    ],
    ids=["empty-prompt", "blank-prompt", "not-utf8-text", "not-utf8-prompt"],
)
def test_bad_generation_arguments_exit_2_in_one_line(bundle, capsys, argv, message):
    """An empty prompt was a silent prediction from the language tag alone; a byte that is not UTF-8 was dropped."""
    from sokhan.pipeline.cli import main

    assert main([argv[0], "--bundle", str(bundle), "--provider", "cpu", *argv[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sokhan: error:") and message in err[0], err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate", "--prompt", "i saw", "--temperature", "nan"], "argument --temperature: nan must be a finite number ≥ 0 (0 = greedy)"),
        (["generate", "--prompt", "i saw", "--temperature", "-1"], "argument --temperature: -1 must be a finite number ≥ 0 (0 = greedy)"),
        (["generate", "--prompt", "i saw", "--temperature", "1", "--seed", "-1"], "argument --seed: -1 must be ≥ 0"),
        (["generate", "--prompt", "i saw", "--top-k", "0"], "argument --top-k: 0 must be ≥ 1"),
        (["generate", "--prompt", "i saw", "--max-new-tokens", "-2"], "argument --max-new-tokens: -2 must be ≥ 0"),
        (["predict", "-k", "0", "i saw"], "argument -k: 0 must be ≥ 1"),
        (["predict", "-k", "two", "i saw"], "argument -k: 'two' is not an integer"),
    ],
    ids=["temperature-nan", "temperature-negative", "seed-negative", "top-k-zero", "max-new-tokens-negative",
         "k-zero", "k-word"],
)
def test_bad_generation_options_are_refused_naming_the_flag(bundle, capsys, argv, message):
    """These were numpy/ValueError tracebacks once, then messages naming the Python API's parameters (`k = 0`)."""
    from sokhan.pipeline.cli import main

    with pytest.raises(SystemExit) as e:
        main([argv[0], "--bundle", str(bundle), "--provider", "cpu", *argv[1:]])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


def test_prompt_outside_the_training_languages_warns_once(bundle, tmp_path, capsys):
    """The bundle names the languages the model was trained on; a prompt in another gets one line on stderr."""
    trained = json.loads((bundle / "config.json").read_text())["languages"]
    assert trained and set(trained) <= {"fa", "zh", "en"}
    only_fa = _broken(bundle, tmp_path, _edit_config("languages", ["fa"]))
    d = Decoder(only_fa, provider="cpu")
    d.next_words("the book", k=2, lang="en")
    d.generate("the book", 2, lang="en")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained on fa text only; it has not seen en" in err[0]
    d.next_words("کتاب", k=2, lang="fa")
    assert capsys.readouterr().err == ""


def test_prompt_in_no_known_script_warns_once(bundle, capsys):
    """Cyrillic or kana has no language to detect; it was read as English without a word."""
    d = Decoder(bundle, provider="cpu")
    capsys.readouterr()
    d.next_words("Привет мир", k=2)
    d.generate("こんにちは", 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'Привет мир' has no Persian, Chinese or Latin words (a URL or an e-mail address is none); it is read as English" in err[0]
    d.next_words("the book", k=2)
    assert capsys.readouterr().err == ""
    # A prompt that normalizes to nothing is the empty-prompt error alone, without the notice before it.
    fresh = Decoder(bundle, provider="cpu")
    capsys.readouterr()
    with pytest.raises(SokhanError, match="empty prompt"):
        fresh.generate("\u200b", 2)
    assert capsys.readouterr().err == ""


def test_chinese_next_word_is_not_cut_where_jieba_cuts_a_partial_word():
    """Tokens 织田 / 信 / 长 / 的 / 是 under the real segmenter. After 织田信 jieba reads 织田 | 信, but 长 would make
    织田信长: the search must go on (its half of the mass), and count 织田 only where the text settles on it."""
    from sokhan.tokenization.segment import may_grow, segment

    class ZhTokenizer:
        PIECES = ["织田", "信", "长", "的", "是"]
        special_tokens = {"<|eos|>": 5}

        def decode(self, ids):
            return "".join(self.PIECES[i] for i in ids if i < 5)

        def segment(self, text, lang):
            return segment(text, lang)

        def word_may_grow(self, text, lang):
            return may_grow(text, lang)

    tok = ZhTokenizer()
    table = {"": {0: 1.0}, "织田": {1: 1.0}, "织田信": {2: 0.5, 3: 0.5}, "织田信长": {4: 1.0}}
    logits_for, step = chain_model(tok, table, end=5)

    take = lambda s, rows: [s[r] for r in rows]  # noqa: E731
    found = dict(next_words(step, [""], logits_for(""), tok, take=take, k=5, beam=4, lang="zh"))
    assert found == {"织田信长": pytest.approx(0.5), "织田": pytest.approx(0.5)}
    # Without the dictionary check the first cut ends the search: 织田信长 could never be predicted.
    cut = dict(next_words(step, [""], logits_for(""), tok, take=take, k=5, beam=4, lang="zh", grows=lambda t: False))
    assert cut == {"织田": pytest.approx(1.0)}
    # Where the search cannot follow a held hypothesis (max_tokens, the beam), its mass stays with the first segment:
    # nothing is lost against the search without the check.
    short = dict(next_words(step, [""], logits_for(""), tok, take=take, k=5, beam=4, lang="zh", max_tokens=2))
    assert short == {"织田": pytest.approx(1.0)}
    mid = dict(next_words(step, [""], logits_for(""), tok, take=take, k=5, beam=4, lang="zh", max_tokens=3))
    assert mid == {"织田": pytest.approx(1.0)}  # 织田信长 unfinished at the limit: still counted, as 织田


def test_an_onnxruntime_too_old_for_the_graphs_is_refused_in_one_line(bundle, monkeypatch):
    """pip enforces the lower bound, but not beside a `--no-deps` install: 1.27 computed the transformer's int8 KV
    cache wrong at batch 2 and 1.24–1.27 could not load the float16 graphs (benchmarks/ort_compat.py)."""
    import onnxruntime as ort

    from sokhan.export import runtime

    for ok in ("1.28.0", "1.31.1", "1.30.0.dev20260101", "2.0.0"):
        runtime.check_version(ok)
    monkeypatch.setattr(ort, "__version__", "1.27.0")
    with pytest.raises(SokhanError, match=r"^onnxruntime 1.27.0 is older than 1.28, .* pip install 'onnxruntime>=1.28'") as e:
        Decoder(bundle, provider="cpu")
    assert "\n" not in str(e.value)


def test_persian_in_and_out_under_an_ascii_locale(bundle):
    """With a locale that is not UTF-8, Python decodes argv and encodes stdout with it: a Persian prompt was refused
    as not UTF-8 (ASCII locale) or read as Latin mojibake (Latin-1), and printing Persian words was a
    UnicodeEncodeError traceback. The bytes the terminal sent are the text, and the output is UTF-8."""
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    env.pop("PYTHONIOENCODING", None)
    prompt = "در جنگل یک".encode("utf-8")
    for argv in ([b"predict", b"--bundle", bytes(bundle), b"--provider", b"cpu", b"-k", b"3", prompt],
                 [b"generate", b"--bundle", bytes(bundle), b"--provider", b"cpu", b"--max-new-tokens", b"3", b"--prompt", prompt]):
        proc = subprocess.run([sys.executable.encode(), b"-m", b"sokhan", *argv], capture_output=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")  # predict: accepted, not "not UTF-8"
        if argv[0] == b"generate":  # the prompt as the model read it, then the continuation: UTF-8
            assert proc.stdout.decode("utf-8").startswith("در جنگل یک")


def test_prompts_from_stdin_are_json_lines_from_one_model(bundle, decoder):
    """`-` reads one prompt per line (the model loaded once, where a command per prompt loaded it every time): one
    JSON object per non-blank line, the same words and text as one prompt at a time."""
    run = lambda argv, data: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "sokhan", *argv, "--bundle", str(bundle), "--provider", "cpu"], input=data,
        capture_output=True, timeout=120)
    out = run(["predict", "-k", "2", "-"], "i saw the\n\n我 喜欢\n".encode())
    assert out.returncode == 0, out.stderr.decode()
    rows = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert [r["line"] for r in rows] == [1, 3]
    for r in rows:
        want = decoder.next_words(r["text"], k=2)
        assert [w for w, _ in r["words"]] == [w for w, _ in want]
        assert [p for _, p in r["words"]] == pytest.approx([p for _, p in want], abs=1e-6)
    out = run(["generate", "--max-new-tokens", "4", "--prompt", "-"], "i saw\n".encode())
    (row,) = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert row["prompt"] == "i saw" and row["continuation"] == decoder.generate("i saw", 4)
    # A line that is not UTF-8 is that line's error, like an empty prompt; it ended the whole batch once.
    out = run(["predict", "-k", "1", "-"], b"i saw\n\xff\xfe\nthe book\n")
    assert out.returncode == 0 and "line 2: not valid UTF-8 (byte 1)" in out.stderr.decode()
    rows = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3] and rows[1] == {"line": 2, "error": "not valid UTF-8 (byte 1)"}
    assert "words" in rows[2]
