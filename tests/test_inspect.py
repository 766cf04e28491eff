"""`sokhan inspect`: attention weights and Δ captured right, PNGs written with shaped Persian labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sokhan.pipeline import inspect
from sokhan.pipeline.cli import main
from sokhan.pipeline.models import ModelConfig, build
from sokhan.pipeline.models.transformer import CausalSelfAttention
from sokhan.pipeline.plotting import label
from test_evaluate import make_run  # the miniature run directory (tests/ is on sys.path under pytest)

SHIR = "در جنگل یک شیر درنده را دیدم"


def test_attention_maps_reproduce_the_layer():
    torch.manual_seed(0)
    model = build(ModelConfig(arch="transformer", d_model=32, n_layers=2, n_heads=4, max_seq_len=32, vocab_size=50).resolve()).eval()
    ids = torch.randint(50, (1, 11))
    outputs = []
    attn = [m for m in model.modules() if isinstance(m, CausalSelfAttention)]
    handles = [m.register_forward_hook(lambda mod, args, out: outputs.append((mod, args, out))) for m in attn]
    maps = inspect.attention_maps(model, ids)
    for h in handles:
        h.remove()
    assert len(maps) == 2 and maps[0].shape == (4, 11, 11)
    for att, (mod, args, out) in zip(maps, outputs[-2:]):
        np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-12)
        assert np.abs(np.triu(att, 1)).max() == 0.0  # causal
        # Weights · values through the output projection give back what the layer computed.
        _, _, v = mod._project(*args)
        y = torch.as_tensor(att)[None].float() @ v  # (1, nh, L, hs)
        torch.testing.assert_close(mod._output(y), out, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("selective", [True, False])
def test_delta_maps(selective):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="mamba", d_model=16, n_layers=3, selective=selective, vocab_size=40).resolve()
    model = build(cfg).eval()
    ids = torch.randint(40, (1, 9))
    maps = inspect.delta_maps(model, ids)
    assert len(maps) == 3 and maps[0].shape == (9, cfg.d_inner)
    assert all((m > 0).all() for m in maps)
    if selective:
        assert maps[0].std(axis=0).max() > 0  # Δ depends on the token
    else:
        mixer = model.backbone.layers[0].mixer
        want = torch.nn.functional.softplus(mixer.dt_bias.detach().double()).numpy()
        np.testing.assert_allclose(maps[0], np.broadcast_to(want, maps[0].shape), rtol=1e-12)  # the same at every token
    assert "_ssm_params_channel_major" not in vars(model.backbone.layers[0].mixer)  # the wrapper is gone
    torch.testing.assert_close(model(ids), model(ids))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {arch: make_run(root, arch)[0] for arch in ("transformer", "mamba")}


@pytest.mark.parametrize("arch", ["transformer", "mamba"])
def test_cli_writes_pngs(tmp_path, runs, arch, capsys):
    run = runs[arch]
    out = tmp_path / "png"
    # The throwaway tokenizer spells Persian nearly letter by letter; a short text keeps the transformer's plots quick.
    text = SHIR if arch == "mamba" else "شیر را دیدم"
    assert main(["inspect", "--run-dir", str(run), "--text", text, "--out", str(out)]) == 0
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == (["attention_layer0.png", "attention_layer1.png"] if arch == "transformer" else ["delta.png"])
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert str(pngs[0]) in capsys.readouterr().out


def test_long_texts_make_figures_of_bounded_size(tmp_path, monkeypatch):
    """The figure grows with the tokens up to MAX_INCHES wide, its labels shrinking to fit, never beyond."""
    import numpy as np

    sizes = []
    from sokhan.pipeline import plotting

    real_save = plotting.save

    def save(fig, path):
        sizes.append(tuple(fig.get_size_inches()))
        return real_save(fig, path)

    monkeypatch.setattr(plotting, "save", save)
    L = inspect.MAX_TOKENS
    labels = [f"t{i}" for i in range(L)]
    inspect.plot_attention([np.full((16, L, L), 1.0 / L)], labels, "long", tmp_path)  # 16 heads: 4 rows
    inspect.plot_delta([np.ones((L, 8))] * 16, labels, "long", tmp_path)  # 16 layers
    assert len(sizes) == 2 and all(w <= inspect.MAX_INCHES and h <= inspect.MAX_INCHES for w, h in sizes)


def test_token_labels_are_shaped(runs):
    from sokhan.tokenization import Tokenizer

    tok = Tokenizer.load(runs["mamba"] / "tokenize" / "tokenizer.json")
    ids = tok.encode(SHIR, "fa", add_special_tokens=True)
    labels = inspect.token_labels(tok, ids)
    assert labels[0] == "<fa>" and labels[-1] == "<eos>"
    for i, lab in zip(ids[1:-1], labels[1:-1]):
        piece = tok.decode([i])
        if "\ufffd" not in piece:
            assert lab == label(piece.strip() or "␣")  # a lone space gets a visible mark
        else:
            assert inspect.PART in lab  # part of a character: the character, marked
    assert any(lab != tok.decode([i]).strip() for i, lab in zip(ids[1:-1], labels[1:-1]))  # Persian was reshaped
    # The throwaway vocabulary splits Chinese characters into bytes: each piece names its whole character.
    zh = inspect.token_labels(tok, tok.encode("狮子", "zh"))
    assert len(zh) > 2 and all(lab.endswith(inspect.PART) for lab in zh)
    assert "".join(dict.fromkeys(lab.rstrip(inspect.PART) for lab in zh)) == "狮子"
    # The mark comes after a split character in reading order: left of a Persian letter, right of a digit (numbers
    # run left to right in Persian too). "·" was always on the right, and read as the Persian zero after digits.
    fa = [lab for lab in inspect.token_labels(tok, tok.encode("ژ ۱۴۰۲", "fa")) if inspect.PART in lab]
    letters, digits = [lab for lab in fa if "۱" not in lab and "۴" not in lab and "۲" not in lab and "۰" not in lab], \
        [lab for lab in fa if any(d in lab for d in "۰۱۲۴")]
    assert letters and all(lab.startswith(inspect.PART) for lab in letters)
    assert digits and all(lab.endswith(inspect.PART) for lab in digits)


class _Pieces:
    """A stand-in tokenizer whose tokens are the given byte strings (one id each)."""

    special_tokens: dict = {}

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    def id_to_bytes(self, i: int) -> bytes:
        return self.pieces[i]


def test_a_token_that_draws_nothing_is_named():
    """The corpora vocabulary's bare ZWNJ token (دانش‌آموزان, بی‌شمار) had a blank label."""
    tok = _Pieces(["دانش".encode(), "\u200c".encode(), "آموزان".encode(), " ".encode()])
    assert inspect.token_labels(tok, [0, 1, 2, 3]) == [label("دانش"), "ZWNJ", label("آموزان"), "␣"]


def test_a_persian_title_keeps_its_order_behind_the_model_name(runs, tmp_path, monkeypatch):
    """"mamba: " + a Persian text with Latin words in it was laid out left to right as a whole: the halves swapped."""
    import arabic_reshaper
    from bidi.algorithm import get_display

    seen = []
    monkeypatch.setattr(inspect, "plot_delta", lambda maps, labels, title, out: seen.append(title) or out / "x.png")
    text = "او به Google رفت"
    assert main(["inspect", "--run-dir", str(runs["mamba"]), "--text", text, "--out", str(tmp_path)]) == 0
    assert seen == ["mamba: " + label(text)] and seen[0] != label("mamba: " + text)
    assert label(text) == get_display(arabic_reshaper.reshape(text), base_dir="R")  # a right-to-left paragraph


def test_bad_input(tmp_path, runs, capsys):
    run = runs["mamba"]
    assert main(["inspect", "--run-dir", str(run), "--text", "... 123"]) == 2
    assert "--lang" in capsys.readouterr().err
    assert main(["inspect", "--run-dir", str(tmp_path / "nope"), "--text", SHIR]) == 2
    assert "nope: no such run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["inspect", "--run-dir", str(tmp_path / "empty"), "--text", SHIR]) == 2
    assert "stage 'tokenize' has not finished" in capsys.readouterr().err
    # --out naming a file (or a folder under one) was a NotADirectoryError / FileExistsError traceback.
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "png"):
        assert main(["inspect", "--run-dir", str(run), "--text", SHIR, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"sokhan: error: --out {out}:"), err
    # With --lang an empty text used to plot the language tag alone, and --max-tokens 0 said "shorten the text".
    assert main(["inspect", "--run-dir", str(run), "--text", "  ", "--lang", "fa"]) == 2
    assert "nothing to inspect" in capsys.readouterr().err
    assert main(["inspect", "--run-dir", str(run), "--text", SHIR, "--max-tokens", "0"]) == 2
    assert "--max-tokens = 0 must be in [2, 256]" in capsys.readouterr().err
    # 1000 let a 200-token text draw 130 × 65-inch figures (13 GB, killed after 5 minutes).
    assert main(["inspect", "--run-dir", str(run), "--text", SHIR, "--max-tokens", "1000"]) == 2
    assert "--max-tokens = 1000 must be in [2, 256]" in capsys.readouterr().err
    # Zero-width characters pass str.strip() but normalize to nothing: the tag alone was plotted.
    assert main(["inspect", "--run-dir", str(run), "--text", "\u200b\u200c", "--lang", "fa"]) == 2
    assert "nothing left to inspect after normalization" in capsys.readouterr().err


def test_model_older_than_the_tokenizer_is_refused(tmp_path, runs, capsys):
    """After `sokhan tokenize --set tokenize.vocab_size=...` the train stage is stale: its ids name other tokens.
    inspect used to plot it anyway, labelled with the new tokenizer's pieces."""
    import json
    import shutil
    from dataclasses import replace

    from sokhan.pipeline.models import build
    from sokhan.pipeline.stage import write_json
    from sokhan.pipeline.train.checkpoint import model_config, save_model_folder

    run = tmp_path / "run"
    shutil.copytree(runs["mamba"], run)
    stored = json.loads((run / "train" / "config.json").read_text())
    cfg = model_config(run / "train" / "config.json")
    stored["model"]["vocab_size"] = cfg.vocab_size + 4
    save_model_folder(run / "train", build(replace(cfg, vocab_size=cfg.vocab_size + 4)), stored)
    write_json(run / "train" / "manifest.json", {"outputs": {"model.safetensors": "z"}})
    assert main(["inspect", "--run-dir", str(run), "--text", SHIR, "--out", str(tmp_path / "png")]) == 2
    err = capsys.readouterr().err
    assert f"model vocabulary {cfg.vocab_size + 4} != tokenizer vocabulary {cfg.vocab_size}" in err and "stale" in err
    assert not (tmp_path / "png").exists()


def test_model_trained_on_an_older_tokenizer_of_the_same_size_is_refused(tmp_path, runs, capsys):
    """`sokhan tokenize` run again with other settings but the same vocabulary size: only the manifests tell."""
    import json
    import shutil

    from sokhan.pipeline.stage import sha256_json

    run = tmp_path / "run"
    shutil.copytree(runs["mamba"], run)
    tok, train = (json.loads((run / s / "manifest.json").read_text()) for s in ("tokenize", "train"))
    train["inputs"] = {"upstream": {"tokenize": sha256_json(tok["outputs"])}}  # what the train stage records
    (run / "train" / "manifest.json").write_text(json.dumps(train))
    tok["outputs"]["tokenizer.json"] = "0" * 64  # as if it had been trained again
    (run / "tokenize" / "manifest.json").write_text(json.dumps(tok))
    assert main(["inspect", "--run-dir", str(run), "--text", SHIR, "--out", str(tmp_path / "png")]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'train'}: made from an older tokenize output" in err
    assert not (tmp_path / "png").exists()
