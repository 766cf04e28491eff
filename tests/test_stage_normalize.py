"""normalize stage: outputs and stats, auto detection, staleness, and every bad input through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sokhan.pipeline.cli import main
from sokhan.pipeline.config import load_config
from sokhan.pipeline.stage import run_stage, status
from sokhan.pipeline.stages.normalize import inputs

FA = "علي كتاب ها را خواند\nاین یک جمله است\n"
ZH = "我们今天去公园，ＡＢＣ。\n自然语言处理\n"
EN = "Hello  world.\nThe second line\n"


def _config(tmp_path: Path, sources: list[tuple[str, str]], **extra: str) -> Path:
    """A TOML config naming ``sources`` (path, lang), plus ``section.key = value`` lines."""
    lines = []
    for path, lang in sources:
        lines += ["[[corpus.paths]]", f'path = "{path}"', f'lang = "{lang}"', ""]
    sections: dict[str, list[str]] = {}
    for key, value in extra.items():
        section, name = key.split("__")
        sections.setdefault(section, []).append(f"{name} = {value}")
    for section, items in sections.items():
        lines += [f"[{section}]", *items, ""]
    cfg = tmp_path / "config.toml"
    cfg.write_text("\n".join(lines), encoding="utf-8")
    return cfg


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def test_outputs_and_stats(tmp_path):
    fa = _write(tmp_path / "c" / "fa.txt", FA + "   \n" + FA)  # a blank line and two duplicates
    zh = _write(tmp_path / "c" / "zh" / "a.txt", ZH)  # a directory source
    en = _write(tmp_path / "c" / "en.txt", EN)
    cfg = load_config(_config(tmp_path, [(fa, "fa"), (zh.parent, "zh"), (en, "en")]))
    run = tmp_path / "run"
    run_stage("normalize", cfg, run)
    out = run / "normalize"
    assert (out / "fa.txt").read_text(encoding="utf-8") == "علی کتاب\u200cها را خواند\nاین یک جمله است\n"
    assert (out / "zh.txt").read_text(encoding="utf-8") == "我们今天去公园，ABC。\n自然语言处理\n"
    assert (out / "en.txt").read_text(encoding="utf-8") == "Hello world.\nThe second line\n"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["lines"] == 6
    assert stats["dropped"] == {"empty": 1, "duplicate": 2, "invalid_utf8": 0, "no_language": 0}
    assert stats["languages"]["fa"]["lines"] == 2
    assert sum(v["share_lines"] for v in stats["languages"].values()) == pytest.approx(1.0, abs=1e-5)
    assert sum(v["chars"] for v in stats["languages"].values()) == stats["chars"]
    assert stats["auto_detected"] == {}
    assert [f["lines_read"] for f in stats["files"]] == [5, 2, 2]


def test_auto_detects_per_line_and_counts(tmp_path):
    mixed = _write(tmp_path / "mixed.txt", "سلام دنیا\n我喜欢Python编程\nI saw 北京 today\n12345\n")
    cfg = load_config(_config(tmp_path, [(mixed, "auto")]))
    run_stage("normalize", cfg, tmp_path / "run")
    out = tmp_path / "run" / "normalize"
    assert (out / "fa.txt").read_text(encoding="utf-8") == "سلام دنیا\n"
    assert (out / "zh.txt").read_text(encoding="utf-8") == "我喜欢Python编程\n"
    assert (out / "en.txt").read_text(encoding="utf-8") == "I saw 北京 today\n"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["auto_detected"] == {"fa": 1, "zh": 1, "en": 1, "none": 1}
    assert stats["dropped"]["no_language"] == 1


def test_inputs_list_files_and_an_edit_makes_the_stage_stale(tmp_path):
    d = tmp_path / "corpus"
    a, b = _write(d / "a.txt", EN), _write(d / "sub" / "b.txt", "Another line\n")
    _write(d / "notes.md", "not text input")
    cfg = load_config(_config(tmp_path, [(d, "en")]))
    assert inputs(cfg) == [a, b]
    run_stage("normalize", cfg, tmp_path / "run")
    assert status("normalize", cfg, tmp_path / "run") == "done"
    b.write_text("Changed line\n", encoding="utf-8")
    assert status("normalize", cfg, tmp_path / "run") == "stale"


def test_digits_option_and_no_dedupe(tmp_path):
    fa = _write(tmp_path / "fa.txt", "سال ۱۴۰۲\nسال ۱۴۰۲\n")
    cfg = load_config(_config(tmp_path, [(fa, "fa")], normalize__digits='"latin"', normalize__dedupe="false"))
    run_stage("normalize", cfg, tmp_path / "run")
    assert (tmp_path / "run" / "normalize" / "fa.txt").read_text(encoding="utf-8") == "سال 1402\nسال 1402\n"


def test_invalid_utf8_replace_and_skip(tmp_path):
    bad = _write(tmp_path / "en.txt", b"good line\nbad \xff byte\nlast line\n")
    for policy, expected, dropped in [("replace", "good line\nbad \ufffd byte\nlast line\n", 0), ("skip", "good line\nlast line\n", 1)]:
        cfg = load_config(_config(tmp_path, [(bad, "en")], corpus__errors=f'"{policy}"'))
        run_stage("normalize", cfg, tmp_path / policy)
        assert (tmp_path / policy / "normalize" / "en.txt").read_text(encoding="utf-8") == expected
        assert json.loads((tmp_path / policy / "normalize" / "stats.json").read_text())["dropped"]["invalid_utf8"] == dropped


def _bad_input(tmp_path, capsys, sources, message, **extra):
    """The CLI on a bad corpus: exit 2, one line naming the problem, no traceback, no RUN/normalize."""
    cfg = _config(tmp_path, sources, **extra)
    run = tmp_path / "run"
    code = main(["normalize", "--run-dir", str(run), "--config", str(cfg)])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("sokhan: error:")]
    assert len(lines) == 1, err
    assert message in lines[0], lines[0]
    assert not (run / "normalize").exists()
    assert not (run / "normalize.partial").exists()
    return lines[0]


def test_bad_invalid_utf8_names_file_and_line(tmp_path, capsys):
    bad = _write(tmp_path / "fa.txt", "خط اول\nخط دوم\n".encode() + b"\xd8 broken\n")
    line = _bad_input(tmp_path, capsys, [(bad, "fa")], f"{bad}:3: invalid UTF-8")
    assert "byte 0xd8, character 1 of the line" in line and 'corpus.errors = "replace" or "skip"' in line


def test_bad_binary_file(tmp_path, capsys):
    blob = _write(tmp_path / "blob.txt", b"text\n\x00\x01\x02\x89PNG")
    _bad_input(tmp_path, capsys, [(blob, "en")], f"{blob}:2: binary file (NUL byte at offset 5)")


def test_bad_binary_file_even_with_replace(tmp_path, capsys):
    blob = _write(tmp_path / "blob.txt", b"\x00\x00")
    _bad_input(tmp_path, capsys, [(blob, "en")], "binary file", corpus__errors='"replace"')


def test_bad_empty_corpus(tmp_path, capsys):
    empty = _write(tmp_path / "empty.txt", "\n  \n\t\n")
    _bad_input(tmp_path, capsys, [(empty, "auto")], "corpus: empty, no non-empty lines in")


def test_bad_missing_path(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "fa.txt"
    _bad_input(tmp_path, capsys, [(missing, "fa")], f"{missing}: no such file or directory (check corpus.paths)")


def test_bad_directory_without_text(tmp_path, capsys):
    d = tmp_path / "corpus"
    _write(d / "data.csv", "a,b\n")
    _bad_input(tmp_path, capsys, [(d, "en")], f"{d}: directory has no *.txt files")


def test_bad_language_with_no_lines(tmp_path, capsys):
    en = _write(tmp_path / "en.txt", EN)
    fa = _write(tmp_path / "fa.txt", "\u200b\n\ufeff\n")  # only invisible characters
    _bad_input(tmp_path, capsys, [(en, "en"), (fa, "fa")],
               f"corpus.paths[1] ({fa}, language 'fa'): no lines left after normalization and deduplication;")
    # Without deduplication the message does not blame it.
    _bad_input(tmp_path, capsys, [(en, "en"), (fa, "fa")],
               f"corpus.paths[1] ({fa}, language 'fa'): no lines left after normalization;", normalize__dedupe="false")


def test_bad_no_paths(tmp_path, capsys):
    _bad_input(tmp_path, capsys, [], "corpus.paths is empty")


def test_sample_corpus(sample_dir, tmp_path):
    """The bundled sample (data/sample) normalizes, with the mixed file auto-detected into all three languages."""
    sources = [(sample_dir / f"{lang}.txt", lang) for lang in ("fa", "zh", "en")] + [(sample_dir / "mixed.txt", "auto")]
    cfg = load_config(_config(tmp_path, sources))
    manifest = run_stage("normalize", cfg, tmp_path / "run")
    stats = json.loads((tmp_path / "run" / "normalize" / "stats.json").read_text())
    assert set(stats["languages"]) == {"fa", "zh", "en"}
    assert all(stats["auto_detected"][lang] > 0 for lang in ("fa", "zh", "en"))
    assert manifest["metrics"]["lines"] == stats["lines"]


def test_same_output_with_one_or_two_workers(sample_dir, tmp_path):
    """The sample (auto-detected lines included) and an invalid line, in one process and in two, the second sending
    5 lines at a time: the same files and stats; and the number of workers is not part of the fingerprint."""
    from sokhan.pipeline.stages import normalize as normalize_stage

    bad = _write(tmp_path / "bad.txt", b"good line\nbad \xff line\n" + "سلام دنیا\n".encode() * 3)
    sources = [(sample_dir / f"{lang}.txt", lang) for lang in ("fa", "zh", "en")] + [(sample_dir / "mixed.txt", "auto"), (bad, "auto")]
    outs, manifests = [], []
    for workers in (1, 2):
        cfg = load_config(_config(tmp_path, sources, normalize__workers=str(workers), corpus__errors='"replace"'))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(normalize_stage, "CHUNK", 5 if workers == 2 else 256)
            mp.setattr(normalize_stage, "MIN_PARALLEL_BYTES", 0)  # the sample is small: workers only when made to
            manifests.append(run_stage("normalize", cfg, tmp_path / f"run{workers}"))
        outs.append({p.name: p.read_bytes() for p in sorted((tmp_path / f"run{workers}" / "normalize").iterdir()) if p.name != "manifest.json"})
    assert outs[0] == outs[1]
    assert sorted(outs[0]) == ["en.txt", "fa.txt", "stats.json", "zh.txt"]  # nothing else left in the folder
    stats = json.loads(outs[0]["stats.json"])
    assert stats["files"][-1]["lines_read"] == 5 and stats["dropped"]["duplicate"] >= 2
    assert manifests[0]["fingerprint"] == manifests[1]["fingerprint"]


def test_workers_checked(tmp_path, capsys):
    cfg = _config(tmp_path, [(_write(tmp_path / "en.txt", EN), "en")], normalize__workers="-1")
    assert main(["normalize", "--run-dir", str(tmp_path / "run"), "--config", str(cfg)]) == 2
    assert "normalize.workers = -1 must be ≥ 0" in capsys.readouterr().err


def test_a_binary_file_is_named_before_an_invalid_line_above_it(tmp_path, capsys):
    """A NUL byte makes the file binary whatever comes before it: the error says so, not the invalid UTF-8 line
    above it (whose advice, corpus.errors = "replace", would only lead to the binary-file error next)."""
    blob = _write(tmp_path / "en.txt", b"fine\nbad \xff\n" + b"x" * 10 + b"\nnul \0 here\n")
    _bad_input(tmp_path, capsys, [(blob, "en")], f"{blob}:4: binary file (NUL byte at offset 26)")


def test_a_source_tagged_with_the_wrong_language_is_named(tmp_path, capsys):
    """Chinese text tagged fa was normalized as Persian in silence (，→ , and nonsense words); now one line says so.
    A Persian source with some English lines in it is not flagged."""
    zh = _write(tmp_path / "zh.txt", ZH * 3)
    fa = _write(tmp_path / "fa.txt", FA + EN + FA.replace("خواند", "دید"))
    run_stage("normalize", load_config(_config(tmp_path, [(zh, "fa"), (fa, "fa")])), tmp_path / "run")
    err = capsys.readouterr().err
    assert f"corpus.paths[0] ({zh}) is tagged 'fa', but 6 of the first 6 lines checked read as 'zh'" in err
    assert "corpus.paths[1]" not in err
