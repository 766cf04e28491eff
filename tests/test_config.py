"""The TOML -> dataclass loader: presets load, bad keys and types are named in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from sokhan import SokhanError
from sokhan.pipeline.config import RunConfig, load_config, parse_override, presets, to_dict


@pytest.mark.parametrize("preset", presets(), ids=lambda p: p.stem)
def test_every_preset_loads(preset: Path):
    cfg = load_config(preset)
    assert isinstance(cfg, RunConfig)
    assert cfg.corpus.paths, f"{preset.name} names no corpus"
    for src in cfg.corpus.paths:
        assert Path(src.path).is_absolute()  # resolved against the preset's folder
    cfg.model.resolve(vocab_size=cfg.tokenize.vocab_size)


def test_sample_preset_points_at_bundled_data():
    cfg = load_config("sample")
    for src in cfg.corpus.paths:
        assert Path(src.path).exists(), src.path


def test_a_preset_name_means_the_preset_in_any_folder(tmp_path, monkeypatch):
    """`--config sample` read the checkout's data/sample/ folder from data/ ("is a directory"), and silently any
    file called `sample` in the current folder; ./sample still names such a file."""
    (tmp_path / "sample").write_text("[model]\ndropout = 0.0\n")
    (tmp_path / "corpora").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_config("sample") == load_config(Path(__file__).parents[1] / "pipeline" / "configs" / "sample.toml")
    assert load_config(Path("corpora")).corpus.paths  # the preset, not the folder
    assert load_config("./sample").model.dropout == 0.0


def test_wheel_carries_every_source_file_and_the_sample_data(tmp_path):
    """A non-editable install carries every module and data file, the sample corpus where the preset's relative
    paths point."""
    import subprocess
    import sys
    import zipfile

    import shutil

    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"  # a copy, so the build's scratch folders stay out of the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    for name in ("pipeline", "tokenization", "export", "kernels", "data"):
        shutil.copytree(repo / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True,
    )
    if built.returncode != 0 and "No module named" in built.stderr:
        pytest.skip(f"cannot build a wheel here: {built.stderr.strip().splitlines()[-1]}")
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("sokhan-*.whl")
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    # Every source file ships: a subpackage left out of pyproject's list is missing only from a non-editable install.
    folders = {"pipeline/_root": "sokhan", "pipeline": "sokhan/pipeline", "tokenization": "sokhan/tokenization",
               "export": "sokhan/export", "kernels": "sokhan/kernels", "data": "sokhan/data"}
    missing = []
    for folder, installed in folders.items():
        for f in (repo / folder).rglob("*"):
            rel = f.relative_to(repo / folder)
            if (f.is_file() and f.suffix in (".py", ".toml", ".txt", ".cpp", ".md") and "__pycache__" not in f.parts
                    and not (folder == "pipeline" and rel.parts[0] == "_root")):
                if not (tmp_path / "site" / installed / rel).is_file():
                    missing.append(f"{folder}/{rel}")
    assert not missing, f"not in the wheel: {missing}"
    cfg = load_config(tmp_path / "site" / "sokhan" / "pipeline" / "configs" / "sample.toml")
    for src in cfg.corpus.paths:
        assert Path(src.path).is_file(), src.path
        assert (tmp_path / "site") in Path(src.path).parents


def test_round_trip_through_dict():
    cfg = load_config("sample", ["train.steps=7", "model.arch='transformer'"])
    again = load_config(None, base=to_dict(cfg))
    assert again == cfg
    assert again.train.steps == 7 and again.model.arch == "transformer"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=5", "unknown key 'train.stepz'"),
        ("nosuch.key=1", "unknown key 'nosuch'"),
        ("train.steps='many'", "train.steps = 'many' must be int"),
        ("train.steps=true", "train.steps = True must be int"),
        ("model.arch='rnn'", "model.arch = 'rnn' is not one of 'transformer' | 'mamba'"),
        ("tokenize.vocab_size=10", "tokenize.vocab_size = 10 must be"),
        ("model.dt_min=0.5", "model.dt_min = 0.5 must be > 0 and ≤ model.dt_max"),
        # TOML's nan and inf pass every `<` check unless refused explicitly.
        ("train.grad_clip=nan", "train.grad_clip = nan must be a finite number"),
        ("train.lr=inf", "train.lr = inf must be a finite number"),
        ("train.lr=-1", "train.lr = -1.0 must be > 0"),  # it blamed min_lr
        ("model.dt_max=inf", "model.dt_min = 0.001 must be > 0 and ≤ model.dt_max = inf"),
        ("model.norm_eps=-1", "model.norm_eps = -1.0 must be a finite number > 0"),
        ("corpus.paths=[{lang='fa'}]", "config: corpus.paths[0]: missing key 'path'"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(SokhanError) as e:
        load_config("sample", [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_int_is_accepted_for_float():
    assert load_config("sample", ["train.lr=1"]).train.lr == 1.0


def test_override_values_are_toml_else_strings():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a.b=transformer") == (["a", "b"], "transformer")
    with pytest.raises(SokhanError, match="expected section.key=value"):
        parse_override("novalue")


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(SokhanError, match="no such file"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 1\n")
    with pytest.raises(SokhanError, match="invalid TOML"):
        load_config(bad)
    with pytest.raises(SokhanError, match="is a directory"):
        load_config(tmp_path)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b"# caf\xe9\n[train]\nsteps = 1\n")
    with pytest.raises(SokhanError, match=r"latin1.toml: not UTF-8 \(byte 0xe9 at offset 5\)"):
        load_config(latin1)


def test_relative_corpus_paths_follow_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    cfg_file = tmp_path / "sub" / "c.toml"
    cfg_file.write_text('[[corpus.paths]]\npath = "../text.txt"\nlang = "fa"\n')
    cfg = load_config(cfg_file)
    assert cfg.corpus.paths[0].path == str(tmp_path / "text.txt")


def test_worker_counts_are_not_part_of_any_fingerprint():
    """normalize.workers changes how the work is spread, not what is written (the stage's tests compare the bytes):
    changing it reruns nothing. tokenize.workers keeps its place in the fingerprint, as runs made before have it."""
    from sokhan.pipeline.config import RunConfig, fingerprint_config
    from sokhan.pipeline.stages.normalize import NormalizeConfig
    from sokhan.pipeline.stages.tokenize import TokenizeConfig

    base = fingerprint_config(RunConfig(), ("corpus", "normalize", "tokenize"))
    other = fingerprint_config(RunConfig(normalize=NormalizeConfig(workers=3)), ("corpus", "normalize", "tokenize"))
    assert other == base and "workers" not in base["normalize"]
    set_tokenize = fingerprint_config(RunConfig(tokenize=TokenizeConfig(workers=2)), ("tokenize",))
    assert set_tokenize["tokenize"]["workers"] == 2  # as the fingerprints of runs made with it set hold it
    changed = fingerprint_config(RunConfig(normalize=NormalizeConfig(dedupe=False)), ("normalize",))
    assert changed != fingerprint_config(RunConfig(), ("normalize",))
