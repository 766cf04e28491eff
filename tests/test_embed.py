"""The embed stage: normal and PPMI-SVD tables, co-occurrence counts, neighbours, the labelled plot, --inspect."""

from __future__ import annotations

import json
import unicodedata

import numpy as np
import pytest
import torch
from tiny_run import make_tiny_run, tiny_config

from sokhan.pipeline import embedding, plotting
from sokhan.pipeline.cli import main
from sokhan.pipeline.models import build
from sokhan.pipeline.stage import run_stage, save_run_config
from sokhan.pipeline.stages.embed import normal_table
from sokhan.pipeline.train import checkpoint as ckpt
from sokhan.pipeline.train.loop import load_embeddings

META = {"vocab_size": 9, "special_tokens": {"<|eos|>": 1, "<|lang:fa|>": 2, "<|lang:en|>": 3}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("run"))


def _table(run_dir):
    return ckpt.read_tensors(run_dir / "embed" / "embeddings.safetensors")[0]["embeddings"].numpy()


def test_normal_table_has_the_model_shape_std_and_seed(run):
    m = run_stage("embed", tiny_config(), run, force=True)["metrics"]
    table = _table(run)
    vocab = json.loads((run / "tokenize" / "meta.json").read_text())["vocab_size"]
    assert table.shape == (vocab, 32) and table.dtype == np.float32
    assert m["std"] == pytest.approx(0.02, rel=0.05) and abs(table.mean()) < 0.002
    np.testing.assert_array_equal(table, normal_table(vocab, 32, 0.02, 0))
    assert not np.array_equal(table, normal_table(vocab, 32, 0.02, 1))
    # train copies it into the input embedding, and so into the tied output projection.
    model = build(tiny_config().model.resolve(vocab))
    load_embeddings(model, run / "embed" / "embeddings.safetensors")
    assert torch.equal(model.get_input_embeddings().weight, torch.from_numpy(table))
    assert torch.equal(model.lm_head.weight, torch.from_numpy(table))


def test_ppmi_svd_groups_tokens_by_language_and_keeps_the_std(run):
    m = run_stage("embed", tiny_config('embed.init="ppmi-svd"'), run, force=True)["metrics"]
    table = _table(run)
    assert float(table.std()) == pytest.approx(0.02, rel=1e-3) and m["ppmi_nonzero"] > 0
    report = json.loads((run / "embed" / "neighbours.json").read_text())
    assert set(report["languages"]) == {"fa", "zh", "en"}
    meta = json.loads((run / "tokenize" / "meta.json").read_text())
    counts = embedding.token_languages(np.fromfile(run / "tokenize" / "train.bin", dtype=np.uint16), meta)
    lang_of = {int(t): lang for lang, c in counts.items() for t in np.flatnonzero(c) if c[t] * 2 > sum(x[t] for x in counts.values())}
    same = total = 0
    for lang, entries in report["languages"].items():
        assert len(entries) == 6
        for e in entries:
            assert len(e["neighbours"]) == 8 and all(-1.0 <= n["cosine"] <= 1.0 for n in e["neighbours"])
            same += sum(lang_of.get(n["id"]) == lang for n in e["neighbours"])
            total += len(e["neighbours"])
    # A random table would put ~1/3 of neighbours in the query's language; co-occurrence puts nearly all there.
    assert same / total > 0.9, same / total


def test_normal_neighbours_are_not_grouped_by_language(run):
    """The control for the test above: the same report on a random table."""
    run_stage("embed", tiny_config(), run, force=True)
    report = json.loads((run / "embed" / "neighbours.json").read_text())
    meta = json.loads((run / "tokenize" / "meta.json").read_text())
    counts = embedding.token_languages(np.fromfile(run / "tokenize" / "train.bin", dtype=np.uint16), meta)
    dominant = {int(t): max(counts, key=lambda lang: counts[lang][t]) for t in range(meta["vocab_size"])}
    pairs = [(lang, n["id"]) for lang, es in report["languages"].items() for e in es for n in e["neighbours"]]
    assert sum(dominant[i] == lang for lang, i in pairs) / len(pairs) < 0.7


def test_cooccurrence_matches_a_brute_force_count_inside_lines():
    rng = np.random.default_rng(0)
    ids = []
    for _ in range(30):
        ids += [int(rng.choice([2, 3])), *rng.integers(4, 9, size=int(rng.integers(0, 7))).tolist(), 1]
    shard = np.asarray(ids, dtype=np.uint16)
    window = 3
    expect = np.zeros((9, 9))
    lines, cur = [], []
    for t in ids:
        cur.append(t)
        if t == 1:
            lines.append(cur)
            cur = []
    for line in lines:
        for i in range(len(line)):
            for d in range(1, window + 1):
                if i + d < len(line):
                    expect[line[i], line[i + d]] += 1.0 / d
                    expect[line[i + d], line[i]] += 1.0 / d
    np.testing.assert_allclose(embedding.cooccurrence(shard, META, 9, window).toarray(), expect, rtol=1e-12)
    # A window past the longest line counts the same pairs, and stops at that line's length (10**9 took minutes).
    longest = max(len(line) for line in lines)
    np.testing.assert_array_equal(embedding.cooccurrence(shard, META, 9, 10**9).toarray(),
                                  embedding.cooccurrence(shard, META, 9, longest).toarray())


def test_ppmi_svd_on_fewer_distinct_tokens_than_dimensions(tmp_path):
    """15 distinct tokens and d_model 32: columns past the PPMI matrix's rank were 0 for every token seen, and
    the rescale (over those zeros too) made the rest ~3x the std asked for. Now they are normal draws."""
    from sokhan.pipeline.stages.embed import EmbedConfig, ppmi_svd_table

    rng = np.random.default_rng(0)
    vocab, d_model = 40, 32
    meta = {"vocab_size": vocab, "special_tokens": {"<|eos|>": 1, "<|lang:en|>": 3}}
    ids = []
    for _ in range(200):
        ids += [3, *rng.integers(4, 16, size=int(rng.integers(2, 9))).tolist(), 1]
    table, extra = ppmi_svd_table(np.asarray(ids, dtype=np.uint16), meta, vocab, d_model, EmbedConfig(init="ppmi-svd"))
    seen = np.zeros(vocab, bool)
    seen[np.unique(ids)] = True
    rank = extra["svd_rank"]
    assert 0 < rank <= seen.sum() < d_model
    spread = table[seen].std(axis=0)  # per column, over the tokens seen
    assert spread.min() > 1e-4  # no dead column (they were 0 to rounding)
    assert table[seen, :rank].std() == pytest.approx(0.02, rel=1e-6)
    assert table[:, rank:].std() == pytest.approx(0.02, rel=0.15)


def test_neighbours_never_pad_with_excluded_tokens_and_persian_zwnj_tokens_count():
    """Fewer candidates than k: the list was filled with excluded tokens at cosine -inf (not valid JSON).
    Tokens with a ZWNJ inside (می‌کند) were never readable, so never plotted or offered as neighbours."""
    table = np.random.default_rng(0).standard_normal((6, 4))
    candidates = np.array([False, False, True, True, True, False])
    report = embedding.nearest_neighbours(table, {"en": [2]}, str, candidates, k=8)
    got = report["languages"]["en"][0]["neighbours"]
    assert [n["id"] for n in got] and all(n["id"] in (3, 4) for n in got) and len(got) == 2
    json.loads(json.dumps(report), parse_constant=lambda c: pytest.fail(f"{c} in the report"))
    assert embedding.readable(" می\u200cکند") and embedding.readable("\u200cهای")
    assert not embedding.readable("a\x07") and not embedding.readable("\ufffd")


def test_token_languages_follow_the_last_marker_across_chunks(monkeypatch):
    ids = [2, 4, 5, 1, 3, 6, 6, 7, 1, 2, 8, 1]
    monkeypatch.setattr(embedding, "CHUNK", 5)  # a line crosses a chunk boundary
    got = embedding.token_languages(np.asarray(ids, dtype=np.uint16), META)
    assert got["fa"].tolist() == [0, 2, 2, 0, 1, 1, 0, 0, 1]
    assert got["en"].tolist() == [0, 1, 0, 1, 0, 0, 2, 1, 0]


def test_plot_labels_are_shaped_persian_and_chinese_text(run, monkeypatch):
    drawn = {}

    def capture(fig, path, **kw):
        drawn["titles"] = [ax.get_title() for ax in fig.axes]
        drawn["labels"] = [t.get_text() for ax in fig.axes for t in ax.texts]
        return real(fig, path, **kw)

    real = plotting.save
    monkeypatch.setattr(plotting, "save", capture)
    run_stage("embed", tiny_config(), run, force=True)
    png = run / "embed" / "embeddings.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 20_000
    labels = drawn["labels"]
    assert [t.split(":")[0] for t in drawn["titles"]] == ["fa", "zh", "en"]
    persian = [t for t in labels if any("ARABIC" in unicodedata.name(c, "") for c in t)]
    han = [t for t in labels if any("CJK UNIFIED" in unicodedata.name(c, "") for c in t)]
    assert len(persian) >= 10 and len(han) >= 10
    # Shaped: letters are presentation forms (U+FB50..U+FEFF), which only label() produces from plain text.
    assert all(all(0xFB50 <= ord(c) <= 0xFEFF for c in t if c != "\u2581") for t in persian)
    assert {"the", "\u2581the"} & set(labels)  # a leading space is drawn as ▁


def test_inspect_draws_the_trained_table_without_rerunning_embed(tmp_path):
    run = make_tiny_run(tmp_path)
    cfg = tiny_config("train.steps=4")
    save_run_config(run, cfg)
    run_stage("embed", cfg, run)
    run_stage("train", cfg, run)
    manifest = (run / "embed" / "manifest.json").read_bytes()
    assert main(["embed", "--run-dir", str(run), "--inspect"]) == 0
    assert (run / "embed" / "manifest.json").read_bytes() == manifest
    assert (run / "train" / "embeddings_trained.png").stat().st_size > 20_000
    report = json.loads((run / "train" / "neighbours_trained.json").read_text())
    assert set(report["languages"]) == {"fa", "zh", "en"}


def test_redrawing_the_plot_leaves_training_current(tmp_path):
    """embed.plot_tokens changes only embeddings.png: train, export and evaluate went stale (and embed --inspect
    refused) because a later stage's fingerprint hashed every file of embed's output."""
    from sokhan.pipeline.stage import status

    run = make_tiny_run(tmp_path)
    cfg = tiny_config("train.steps=2")
    run_stage("embed", cfg, run)
    run_stage("train", cfg, run)
    redraw = tiny_config("train.steps=2", "embed.plot_tokens=5")
    table = (run / "embed" / "embeddings.safetensors").read_bytes()
    run_stage("embed", redraw, run)
    assert (run / "embed" / "embeddings.safetensors").read_bytes() == table
    assert status("embed", redraw, run) == "done" and status("train", redraw, run) == "done"
    # `sokhan status` says so before: a report-only setting leaves train out of what would rerun.
    from sokhan.pipeline.stage import describe

    rows = {r["stage"]: r for r in describe(tiny_config("train.steps=2", "embed.plot_tokens=7"), run)}
    assert rows["embed"]["state"] == "stale" and rows["train"]["state"] == "done"
    # A new table does make training stale.
    run_stage("embed", tiny_config("train.steps=2", "embed.seed=1"), run)
    assert status("train", tiny_config("train.steps=2", "embed.seed=1"), run) == "stale"


def test_inspect_before_training_is_a_one_line_error(tmp_path, capsys):
    run = make_tiny_run(tmp_path)
    save_run_config(run, tiny_config())
    assert main(["embed", "--run-dir", str(run), "--inspect"]) == 2
    assert "stage 'train' has not finished" in capsys.readouterr().err
