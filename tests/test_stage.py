"""The stage contract on stand-in stages: skip when up to date, stale on change, atomic publication, resume."""

from __future__ import annotations

import sys
import json
import types
from pathlib import Path

import pytest

from sokhan import SokhanError
from sokhan.pipeline import stage as stage_mod
from sokhan.pipeline.config import ADDED_LATER, RunConfig, load_config, to_dict


def _make_stages(tmp_path: Path, calls: list[str]):
    source = tmp_path / "source.txt"
    source.write_text("hello\n")

    def up_run(ctx):
        calls.append("up")
        (ctx.out / "data.txt").write_text(source.read_text().upper())
        return {"n": 1}

    def down_run(ctx):
        calls.append("down")
        text = (ctx.upstream("up") / "data.txt").read_text()
        if getattr(ctx.args, "fail", False):
            (ctx.out / "half.txt").write_text("half")
            raise SokhanError("down: failed on purpose")
        (ctx.out / "out.txt").write_text(text * 2)
        return {}

    up = types.SimpleNamespace(SECTIONS=("normalize",), UPSTREAM=(), run=up_run, inputs=lambda cfg: [source])
    down = types.SimpleNamespace(SECTIONS=("train",), UPSTREAM=("up",), run=down_run)
    return source, {"up": up, "down": down}


@pytest.fixture
def stages(tmp_path, monkeypatch):
    calls: list[str] = []
    source, mods = _make_stages(tmp_path, calls)
    monkeypatch.setattr(stage_mod, "stage_module", lambda name: mods[name])
    return types.SimpleNamespace(calls=calls, source=source, mods=mods, run=tmp_path / "run")


def test_skip_when_up_to_date_and_rerun_when_forced(stages):
    cfg = load_config("sample")
    m1 = stage_mod.run_stage("up", cfg, stages.run)
    m2 = stage_mod.run_stage("up", cfg, stages.run)
    assert stages.calls == ["up"] and m1 == m2
    stage_mod.run_stage("up", cfg, stages.run, force=True)
    assert stages.calls == ["up", "up"]
    man = json.loads((stages.run / "up" / "manifest.json").read_text())
    assert man["metrics"] == {"n": 1}
    assert set(man["outputs"]) == {"data.txt"}
    assert man["versions"]["sokhan"]
    assert set(man["config"]) == {"normalize"}


def test_config_change_in_own_section_only_makes_stale(stages):
    cfg = load_config("sample")
    stage_mod.run_stage("up", cfg, stages.run)
    assert stage_mod.status("up", load_config("sample", ["train.steps=3"]), stages.run) == "done"
    assert stage_mod.status("up", load_config("sample", ["normalize.dedupe=false"]), stages.run) == "stale"


def test_a_key_added_later_is_left_out_of_the_fingerprint_at_its_old_value(stages):
    """train.embedding_weight_decay came after runs existed. At 0, what those runs did, a stage's fingerprint is the
    one the code before it computed (so upgrading leaves finished stages up to date and an interrupted training run
    its checkpoints); any other value makes the stage stale. The manifest still records the key."""
    cfg = load_config("sample")
    stage_mod.run_stage("up", cfg, stages.run)
    man = stage_mod.run_stage("down", cfg, stages.run)
    assert man["config"]["train"]["embedding_weight_decay"] == 0.0
    _, inputs = stage_mod._fingerprint("down", stages.mods["down"], cfg, stages.run)
    before = {k: v for k, v in to_dict(cfg)["train"].items() if k != "embedding_weight_decay"}
    assert inputs["config"] == {"train": before}
    assert stage_mod.status("down", cfg, stages.run) == "done"
    changed = load_config("sample", ["train.embedding_weight_decay=0.1"])
    assert stage_mod.status("down", changed, stages.run) == "stale"


def test_keys_added_later_are_listed_with_their_defaults():
    defaults = to_dict(RunConfig())
    for (section, key), value in ADDED_LATER.items():
        assert defaults[section][key] == value, f"{section}.{key}"


def test_input_file_and_upstream_changes_propagate(stages):
    cfg = load_config("sample")
    stage_mod.run_stage("up", cfg, stages.run)
    stage_mod.run_stage("down", cfg, stages.run)
    assert stage_mod.status("down", cfg, stages.run) == "done"
    stages.source.write_text("changed\n")
    assert stage_mod.status("up", cfg, stages.run) == "stale"
    stage_mod.run_stage("up", cfg, stages.run)
    assert stage_mod.status("down", cfg, stages.run) == "stale"
    stage_mod.run_stage("down", cfg, stages.run)
    assert (stages.run / "down" / "out.txt").read_text() == "CHANGED\n" * 2


def test_missing_upstream_is_one_clear_error(stages):
    with pytest.raises(SokhanError, match="stage 'up' has not finished"):
        stage_mod.run_stage("down", load_config("sample"), stages.run)


def test_failed_stage_publishes_nothing_and_keeps_the_old_result(stages):
    cfg = load_config("sample")
    stage_mod.run_stage("up", cfg, stages.run)
    stage_mod.run_stage("down", cfg, stages.run)
    before = (stages.run / "down" / "manifest.json").read_text()
    with pytest.raises(SokhanError):
        stage_mod.run_stage("down", cfg, stages.run, force=True, args=types.SimpleNamespace(fail=True))
    assert (stages.run / "down" / "manifest.json").read_text() == before
    assert not (stages.run / "down" / "half.txt").exists()
    assert not (stages.run / "down.partial").exists()


def test_resumable_stage_keeps_its_work_for_the_next_attempt(stages, capsys):
    cfg = load_config("sample")
    seen = []

    def flaky(ctx):
        seen.append(ctx.resumed)
        marker = ctx.out / "progress.txt"
        if not marker.exists():
            marker.write_text("step 1")
            raise KeyboardInterrupt
        return {"resumed_from": marker.read_text()}

    stages.mods["up"].run = flaky
    stages.mods["up"].RESUMABLE = True
    with pytest.raises(KeyboardInterrupt):
        stage_mod.run_stage("up", cfg, stages.run)
    assert not (stages.run / "up").exists() and (stages.run / "up.partial").exists()
    man = stage_mod.run_stage("up", cfg, stages.run)
    assert seen == [False, True]
    assert man["metrics"] == {"resumed_from": "step 1"}
    # A changed config must not resume from work done under the old one.
    with pytest.raises(KeyboardInterrupt):
        stage_mod.run_stage("up", load_config("sample", ["normalize.dedupe=false"]), stages.run)
    assert seen == [False, True, False]
    # ... and says so when it throws away an interrupted run's work.
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        stage_mod.run_stage("up", load_config("sample", ["normalize.remove_diacritics=false"]), stages.run)
    assert seen == [False, True, False, False]
    assert f"up: discarding the interrupted run in {stages.run / 'up.partial'}" in capsys.readouterr().err


def test_atomic_write_replaces_whole_files(tmp_path):
    p = tmp_path / "f.json"
    stage_mod.write_json(p, {"a": 1})
    stage_mod.write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}
    assert [x.name for x in tmp_path.iterdir()] == ["f.json"]


def _interrupted_resumable(stages, cfg):
    """Make ``up`` resumable and leave an interrupted attempt (a progress file) under ``cfg``."""

    attempts = []

    def flaky(ctx):  # interrupted the first time only
        attempts.append(1)
        if len(attempts) == 1:
            (ctx.out / "progress.txt").write_text("step 1")
            raise KeyboardInterrupt
        return {}

    stages.mods["up"].run = flaky
    stages.mods["up"].RESUMABLE = True
    with pytest.raises(KeyboardInterrupt):
        stage_mod.run_stage("up", cfg, stages.run)
    return stages.run / "up.partial"


def test_resume_flag_refuses_to_discard_work_made_under_another_config(stages, capsys):
    partial = _interrupted_resumable(stages, load_config("sample"))
    changed = load_config("sample", ["normalize.dedupe=false"])
    with pytest.raises(SokhanError) as e:
        stage_mod.run_stage("up", changed, stages.run, args=types.SimpleNamespace(resume=True))
    assert "nothing was deleted" in str(e.value) and "normalize.dedupe: True → False" in str(e.value)
    assert (partial / "progress.txt").read_text() == "step 1"
    with pytest.raises(SokhanError, match="--resume and --force"):
        stage_mod.run_stage("up", changed, stages.run, force=True, args=types.SimpleNamespace(resume=True))
    assert (partial / "progress.txt").exists()
    # Without --resume the work goes, and the log says which setting changed.
    capsys.readouterr()
    stage_mod.run_stage("up", changed, stages.run)
    assert "(changed since: normalize.dedupe: True → False)" in capsys.readouterr().err
    assert not partial.exists() and (stages.run / "up" / "manifest.json").exists()


def test_resumable_stage_that_fails_before_writing_anything_leaves_no_folder(stages):
    def refuse(ctx):
        raise SokhanError("refused at start-up")

    stages.mods["up"].run = refuse
    stages.mods["up"].RESUMABLE = True
    with pytest.raises(SokhanError):
        stage_mod.run_stage("up", load_config("sample"), stages.run)
    assert not (stages.run / "up.partial").exists()


def test_stage_refuses_an_upstream_made_from_older_outputs(stages):
    """up -> down -> last: after up runs again, down is stale; last must not read it as if it matched up."""
    calls = stages.calls
    stages.mods["last"] = types.SimpleNamespace(
        SECTIONS=("evaluate",), UPSTREAM=("down",), run=lambda ctx: calls.append("last") or {})
    cfg = load_config("sample")
    for name in ("up", "down", "last"):
        stage_mod.run_stage(name, cfg, stages.run)
    stages.source.write_text("changed\n")
    stage_mod.run_stage("up", cfg, stages.run)
    with pytest.raises(SokhanError, match=r"down: made from an older up output .* run `sokhan run --run-dir"):
        stage_mod.run_stage("last", cfg, stages.run, force=True)
    stage_mod.run_stage("down", cfg, stages.run)
    stage_mod.run_stage("last", cfg, stages.run)
    assert calls == ["up", "down", "last", "up", "down", "last"]


def test_damaged_manifest_reruns_the_stage(stages, capsys):
    cfg = load_config("sample")
    stage_mod.run_stage("up", cfg, stages.run)
    (stages.run / "up" / "manifest.json").write_text('{"stage": "up", "fingerp')
    stage_mod.run_stage("up", cfg, stages.run)
    assert stages.calls == ["up", "up"] and "not valid JSON" in capsys.readouterr().err


def test_versions_reads_the_installed_version_of_a_module_without_one(monkeypatch):
    """hazm has no ``__version__``: manifests said ``"hazm": null`` where hazm 0.10.0 had normalized the text."""
    import importlib.metadata

    from sokhan.pipeline.stage import versions

    monkeypatch.setitem(sys.modules, "hazm", types.ModuleType("hazm"))  # imported, no __version__, as hazm is
    assert versions()["hazm"] == importlib.metadata.version("hazm")


def test_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import errno
    import os

    p = tmp_path / "f.json"
    stage_mod.write_json(p, {"a": 1})

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        stage_mod.write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 1}
    assert [x.name for x in tmp_path.iterdir()] == ["f.json"]


def test_finished_work_that_cannot_be_published_is_resumed_not_discarded(stages, monkeypatch, capsys):
    """A full disk when the manifest was written used to leave a finished training run without its stamps:
    `status` called it another config's work, `run` deleted it and trained again, `--resume` deleted it too."""
    cfg = load_config("sample")
    seen = []

    def work(ctx):
        seen.append(ctx.resumed)
        (ctx.out / "model.bin").write_text("weights")
        return {}

    stages.mods["up"].run = work
    stages.mods["up"].RESUMABLE = True
    real = stage_mod.write_json

    def full_once(path, obj):
        if Path(path).name == "manifest.json" and len(seen) == 1:
            raise OSError(28, "No space left on device")
        real(path, obj)

    monkeypatch.setattr(stage_mod, "write_json", full_once)
    with pytest.raises(OSError):
        stage_mod.run_stage("up", cfg, stages.run)
    partial = stages.run / "up.partial"
    assert (partial / "model.bin").exists() and (partial / ".fingerprint").exists()
    man = stage_mod.run_stage("up", cfg, stages.run, args=types.SimpleNamespace(resume=True))
    assert seen == [False, True]
    assert set(man["outputs"]) == {"model.bin"}  # the stamps are not outputs
    assert sorted(p.name for p in (stages.run / "up").iterdir()) == ["manifest.json", "model.bin"]


def test_resume_flag_never_deletes_a_partial_without_stamps(stages):
    partial = _interrupted_resumable(stages, load_config("sample"))
    (partial / ".fingerprint").unlink()
    (partial / ".fingerprint.json").unlink()
    with pytest.raises(SokhanError, match="nothing was deleted"):
        stage_mod.run_stage("up", load_config("sample"), stages.run, args=types.SimpleNamespace(resume=True))
    assert (partial / "progress.txt").read_text() == "step 1"


def test_an_output_folder_that_refuses_writes_is_named_before_the_work(tmp_path, monkeypatch):
    """`synth --out` on a read-only folder trained every model first and failed writing the results."""
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(SokhanError, match=r"^--out .*: cannot write into this folder \(Read-only file system\)$"):
        stage_mod.ensure_dir(tmp_path / "out", "--out")


def test_a_stage_that_cannot_write_its_stamps_leaves_no_folder(stages, monkeypatch):
    cfg = load_config("sample")
    real = stage_mod.atomic_write

    def full(path, data):
        if Path(path).name.startswith(".fingerprint"):
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(stage_mod, "atomic_write", full)
    with pytest.raises(OSError):
        stage_mod.run_stage("up", cfg, stages.run)
    assert not (stages.run / "up.partial").exists()


def test_a_closed_stderr_loses_the_log_not_the_work(stages, monkeypatch):
    """`sokhan run … 2>&1 | head -1`: the next log line raised BrokenPipeError midway, the stage was dropped and
    the command exited 0."""
    import io
    import os

    class Closed(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            return self._fd

    closed = Closed()
    closed._fd = os.open(os.devnull, os.O_WRONLY)
    monkeypatch.setattr("sys.stderr", closed)
    monkeypatch.setattr(os, "dup2", lambda *a: None)
    stage_mod.run_stage("up", load_config("sample"), stages.run)
    assert (stages.run / "up" / "manifest.json").exists()


def test_versions_say_whether_the_checkout_had_changes(tmp_path, monkeypatch):
    """A commit alone named the code of a run made with uncommitted changes; manifests now say there were some."""
    import subprocess

    def fake_git(status_output):
        def run(argv, **kwargs):
            out = "abc123\n" if argv[1] == "rev-parse" else status_output
            return subprocess.CompletedProcess(argv, 0, stdout=out, stderr="")
        return run

    monkeypatch.setattr(stage_mod.subprocess, "run", fake_git(" M pipeline/stage.py\n"))
    assert stage_mod.versions()["git_commit"] == "abc123" and stage_mod.versions()["git_modified"] is True
    monkeypatch.setattr(stage_mod.subprocess, "run", fake_git(""))
    assert stage_mod.versions()["git_modified"] is False


def test_status_names_an_interrupted_run_beside_a_finished_stage(stages, monkeypatch):
    """An interrupted `--force` rerun left RUN/train.partial (12 MB of checkpoints on the sample) that `run` skips
    and `status` did not mention."""
    monkeypatch.setattr(stage_mod, "STAGES", ("up", "down"))
    cfg = load_config("sample")
    up = stages.mods["up"]
    up.RESUMABLE = True
    up.resumable_step = lambda partial: 40 if (partial / "progress.txt").exists() else None
    stage_mod.run_stage("up", cfg, stages.run)

    def interrupted(ctx):
        (ctx.out / "progress.txt").write_text("step 40")
        raise KeyboardInterrupt

    up.run = interrupted
    with pytest.raises(KeyboardInterrupt):
        stage_mod.run_stage("up", cfg, stages.run, force=True)
    row = stage_mod.describe(cfg, stages.run)[0]
    assert row["state"] == "done"
    assert row["why"] == "up.partial holds a rerun interrupted at step 40 (--force): another --force starts it over"
    with pytest.raises(KeyboardInterrupt):
        stage_mod.run_stage("up", load_config("sample", ["normalize.dedupe=false"]), stages.run)
    row = stage_mod.describe(cfg, stages.run)[0]
    assert row["state"] == "done" and row["why"] == (
        "up.partial holds a run interrupted at step 40 under other settings: resumed if you run with them again")
