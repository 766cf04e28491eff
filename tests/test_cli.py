"""The `sokhan` command itself: light to import, one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sokhan import SokhanError
from sokhan.pipeline.cli import main


# Imported by `sokhan --help` or by a command before it does any work: heavy libraries wait until a function needs them.
LIGHT_MODULES = [
    "sokhan.pipeline.cli",
    "sokhan.pipeline.config",
    *(f"sokhan.pipeline.stages.{name}" for name in ("normalize", "tokenize", "embed", "train", "export", "evaluate")),
    "sokhan.export.cli",
    "sokhan.pipeline.synth",
    "sokhan.pipeline.inspect",
]
HEAVY = ("torch", "hazm", "jieba", "matplotlib")


def test_cli_and_command_modules_import_no_heavy_library():
    code = (
        "import importlib, sys\n"
        f"for m in {LIGHT_MODULES!r}: importlib.import_module(m)\n"
        "from sokhan.pipeline.cli import build_parser; build_parser()\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "sokhan", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("sokhan ")


def test_unknown_stage_and_bad_override_are_one_line(tmp_path, capsys):
    assert main(["run", "sample", "--run-dir", str(tmp_path / "r"), "--stages", "normalize,bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "sokhan: error: --stages: unknown stage 'bogus' (stages: normalize, tokenize, embed, train, export, evaluate)"
    assert not (tmp_path / "r").exists()  # refused before the run directory (and its lock file) is made
    text = tmp_path / "t.txt"
    text.write_text("the cat\n", encoding="utf-8")
    assert main(["evaluate", "--run-dir", str(tmp_path / "r"), "--config", "sample", "--text", str(text)]) == 2
    err = capsys.readouterr().err
    assert "no such run directory" in err and not (tmp_path / "r").exists()
    # The hint names a config: `sokhan run --run-dir runs/corpora-mamba` alone started one on the sample preset.
    assert f"start one with `sokhan run CONFIG --run-dir {tmp_path / 'r'}` (CONFIG: sample, corpora" in err
    assert main(["run", "sample", "--run-dir", str(tmp_path / "r"), "--set", "train.steps=lots"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sokhan: error: config: train.steps = 'lots' must be int") and "\n" not in err


def test_run_takes_its_config_once(tmp_path, capsys):
    """``run CONFIG --config OTHER``: the positional one used to win without a word."""
    assert main(["run", "sample", "--config", "corpora", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "give the config once" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_run_without_run_dir_works_in_runs_named_for_the_config(tmp_path, monkeypatch):
    """``sokhan run my.toml`` used runs/sample, the sample's run, whatever the config: now runs/my."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copy(Path(__file__).resolve().parent.parent / "data" / "sample" / "en.txt", tmp_path / "en.txt")
    (tmp_path / "my.toml").write_text('[[corpus.paths]]\npath = "en.txt"\nlang = "en"\n', encoding="utf-8")
    assert main(["run", "my.toml", "--stages", "normalize"]) == 0
    assert (tmp_path / "runs" / "my" / "normalize" / "en.txt").is_file() and not (tmp_path / "runs" / "sample").exists()
    assert main(["run", "--config", "sample", "--stages", "normalize"]) == 0
    assert (tmp_path / "runs" / "sample" / "normalize" / "fa.txt").is_file()


def test_a_first_command_that_fails_leaves_no_run_directory(tmp_path, capsys):
    """A config with no corpus, or a missing corpus path, failed in a folder that then held only the lock file."""
    (tmp_path / "empty.toml").write_text("[train]\nsteps = 5\n", encoding="utf-8")
    (tmp_path / "missing.toml").write_text('[[corpus.paths]]\npath = "nowhere.txt"\nlang = "fa"\n', encoding="utf-8")
    for name, message in (("empty", "corpus.paths is empty"), ("missing", "no such file or directory")):
        run = tmp_path / f"run-{name}"
        assert main(["run", str(tmp_path / f"{name}.toml"), "--run-dir", str(run)]) == 2
        assert message in capsys.readouterr().err and not run.exists()
    # A run directory that was there before keeps what it had.
    kept = tmp_path / "kept"
    kept.mkdir()
    assert main(["run", str(tmp_path / "empty.toml"), "--run-dir", str(kept)]) == 2
    assert kept.is_dir()


def test_single_stage_needs_a_config(tmp_path, capsys):
    assert main(["tokenize", "--run-dir", str(tmp_path / "empty")]) == 2
    assert "no config.json here" in capsys.readouterr().err


def test_a_failed_command_does_not_leave_its_settings_in_the_run(tmp_path, capsys):
    """A --set the stage rejects is not inherited by the next command: the previous config.json comes back."""
    run = tmp_path / "r"
    assert main(["run", "sample", "--run-dir", str(run), "--stages", "normalize"]) == 0
    before = (run / "config.json").read_bytes()
    # The corpus path is checked by the stage, not by the config loader: the config was valid and saved first.
    assert main(["normalize", "--run-dir", str(run), "--set", "corpus.paths=[{path='nowhere.txt', lang='fa'}]"]) != 0
    assert "nowhere.txt" in capsys.readouterr().err
    assert (run / "config.json").read_bytes() == before
    assert json.loads(before)["corpus"]["paths"][0]["path"] != "nowhere.txt"


def test_a_failed_first_run_keeps_the_config_of_the_stages_it_published(tmp_path, monkeypatch, capsys):
    """A first run whose later stage failed (a file size limit, in a user's run) deleted config.json and kept the
    finished stages: `status` could not run, and `sokhan run --run-dir` redid them under the sample preset."""
    from sokhan.pipeline.stages import tokenize

    def fail(ctx):
        raise SokhanError("tokenize: cannot write (File too large)")

    monkeypatch.setattr(tokenize, "run", fail)
    run = tmp_path / "r"
    assert main(["run", "sample", "--run-dir", str(run), "--stages", "normalize,tokenize",
                 "--set", "normalize.workers=1"]) == 2
    assert "File too large" in capsys.readouterr().err
    assert (run / "normalize" / "manifest.json").exists() and not (run / "tokenize").exists()
    assert json.loads((run / "config.json").read_text())["normalize"]["workers"] == 1  # the --set stays with it
    monkeypatch.undo()
    assert main(["status", "--run-dir", str(run), "--json"]) == 0
    states = {r["stage"]: r["state"] for r in json.loads(capsys.readouterr().out)}
    assert states["normalize"] == "done" and states["tokenize"] == "missing"

    # A stage that fails after publishing (evaluate's table printed to a full disk): its output is in place, so
    # the config it was made under stays too.
    import errno
    import os

    from sokhan.pipeline.stages import normalize

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(normalize, "show", full, raising=False)
    assert main(["run", "--run-dir", str(run), "--stages", "normalize", "--set", "normalize.dedupe=false"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert json.loads((run / "normalize" / "manifest.json").read_text())["config"]["normalize"]["dedupe"] is False
    assert json.loads((run / "config.json").read_text())["normalize"]["dedupe"] is False


def test_a_second_command_in_a_busy_run_directory_is_refused(tmp_path, capsys):
    """Two commands in one run directory trampled each other (a resume racing a run: a FileNotFoundError traceback)."""
    import fcntl

    run = tmp_path / "r"
    run.mkdir()
    with open(run / ".sokhan.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 12345")
        held.flush()
        assert main(["run", "sample", "--run-dir", str(run), "--stages", "normalize"]) == 2
        err = capsys.readouterr().err
        assert f"{run}: another sokhan command is working in this run directory (pid 12345)" in err
        assert not (run / "normalize").exists() and not (run / "config.json").exists()
    assert main(["run", "sample", "--run-dir", str(run), "--stages", "normalize"]) == 0  # released: it runs
    # A stage's own direct commands too: embed --inspect writes into RUN/train, which a running train replaces.
    with open(run / ".sokhan.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        assert main(["embed", "--run-dir", str(run), "--inspect"]) == 2
        assert "another sokhan command is working in this run directory" in capsys.readouterr().err


def test_status_says_what_run_would_do_and_runs_nothing(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["run", "sample", "--run-dir", str(run), "--stages", "normalize"]) == 0
    capsys.readouterr()
    assert main(["status", "--run-dir", str(run), "--json"]) == 0
    rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}
    assert list(rows) == ["normalize", "tokenize", "embed", "train", "export", "evaluate"]
    assert rows["normalize"]["state"] == "done" and rows["normalize"]["finished_at"]
    assert all(rows[s]["state"] == "missing" for s in ("tokenize", "embed", "train", "export", "evaluate"))
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert main(["status", "--run-dir", str(run), "--set", "normalize.dedupe=false"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["stage", "state", "finished", "took", "why"]
    assert out[1].startswith("normalize") and "stale" in out[1] and out[1].endswith("normalize.dedupe: True → False")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing written, config.json included
    # Model sizes that do not fit together are refused by status as by run (status called them stale, run failed
    # only once training resolved them, after embed had run again).
    capsys.readouterr()
    assert main(["status", "--run-dir", str(run), "--set", "model.arch=transformer", "--set", "model.d_model=130"]) == 2
    assert "model.d_model = 130 must" in capsys.readouterr().err
    assert main(["run", "--run-dir", str(run), "--set", "model.arch=transformer", "--set", "model.d_model=132"]) == 2
    assert "heads of an even size" in capsys.readouterr().err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert main(["status", "--run-dir", str(tmp_path / "none")]) == 2
    # --check answers a script: 1 while `sokhan run` has work to do, 0 once every stage is done.
    assert main(["status", "--run-dir", str(run), "--check"]) == 1
    assert main(["status", "--run-dir", str(tmp_path / "none"), "--check"]) == 2


def test_status_says_whether_an_interrupted_training_run_would_resume(tmp_path, capsys):
    from sokhan.pipeline.config import load_config
    from sokhan.pipeline.stage import _fingerprint, stage_module

    run = tmp_path / "r"
    assert main(["run", "sample", "--run-dir", str(run), "--stages", "normalize,tokenize,embed"]) == 0
    partial = run / "train.partial"
    (partial / "checkpoints" / "step_000040").mkdir(parents=True)  # what a run killed after step 40 leaves
    fp, inputs = _fingerprint("train", stage_module("train"), load_config("sample"), run)
    (partial / ".fingerprint").write_text(fp)
    (partial / ".fingerprint.json").write_text(json.dumps(inputs))
    capsys.readouterr()
    assert main(["status", "--run-dir", str(run), "--json"]) == 0
    train = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}["train"]
    assert train["state"] == "interrupted" and train["why"] == "interrupted at step 40: `sokhan run` resumes it"
    assert main(["status", "--run-dir", str(run), "--json", "--set", "train.lr=0.001"]) == 0
    train = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}["train"]
    assert train["why"] == ("interrupted at step 40 under other settings (train.lr: 0.003 → 0.001): "
                            "`sokhan run` discards it")


def test_ctrl_c_wrapped_by_a_library_is_still_an_interruption(monkeypatch, capsys):
    """Ctrl-C during `export` came back as torch.onnx's TorchExportError (raised while handling the
    KeyboardInterrupt): 86 to 142 lines of traceback and exit 1 instead of the one-line interruption."""
    from sokhan.pipeline import cli

    def export_interrupted(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise RuntimeError("Failed to export the model with torch.export") from e

    monkeypatch.setattr(cli, "_run", export_interrupted)
    assert main(["export", "--run-dir", "r"]) == 130
    assert capsys.readouterr().err.strip() == (
        "sokhan: interrupted; finished stages are kept, the interrupted one is not published")
    monkeypatch.setattr(cli, "_run", lambda args: 1 / 0)  # anything else is not dressed up as an interruption
    with pytest.raises(ZeroDivisionError):
        main(["export", "--run-dir", "r"])


@pytest.mark.parametrize("error,line", [
    (OSError(28, "No space left on device", "RUN/normalize.partial/fa.txt"), "RUN/normalize.partial/fa.txt: No space left on device"),
    # torch.onnx's exporter wraps what onnx.save raised; safetensors (Rust) says it in its own words.
    (RuntimeError("export failed"), "a/b: Read-only file system"),
    (Exception("Error while serializing: No space left on device (os error 28)"), "No space left on device (os error 28)"),
])
def test_a_failing_machine_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys, error, line):
    """A full disk, a read-only folder, a file size limit: every stage used to end in a Python traceback."""
    from sokhan.pipeline import stage as stage_mod

    if str(error) == "export failed":
        try:
            raise OSError(30, "Read-only file system", "a/b")
        except OSError as cause:
            error.__cause__ = cause

    def fail(name, *args, **kwargs):
        raise error

    monkeypatch.setattr(stage_mod, "run_stage", fail)
    assert main(["run", "sample", "--run-dir", str(tmp_path / "run"), "--stages", "normalize"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sokhan: error: {line}; finished stages are kept"]


def test_a_bug_still_shows_its_traceback(tmp_path, monkeypatch):
    from sokhan.pipeline import stage as stage_mod

    def fail(name, *args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(stage_mod, "run_stage", fail)
    with pytest.raises(ValueError, match="a bug"):
        main(["run", "sample", "--run-dir", str(tmp_path / "run"), "--stages", "normalize"])


# A stage that receives SIGTERM (kill, a scheduler's time limit) halfway through writing its partial folder.
SIGTERM_MIDWAY = """
import os, signal, sys, time
from sokhan.pipeline.cli import main
from sokhan.pipeline.stages import normalize

def run(ctx):
    (ctx.out / "fa.txt").write_text("half of it")
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)

normalize.run = run
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_stops_a_stage_as_cleanly_as_ctrl_c(tmp_path):
    """SIGTERM's default action killed the process on the spot: RUN/normalize.partial/ stayed, half-written."""
    script = tmp_path / "sigterm.py"
    script.write_text(SIGTERM_MIDWAY)
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, str(script), "run", "sample", "--run-dir", str(run), "--stages", "normalize"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 143, done.stderr[-2000:]  # 128 + 15, as a shell reports a process SIGTERM killed
    assert done.stderr.strip().splitlines()[-1] == (
        "sokhan: terminated (SIGTERM); finished stages are kept, the interrupted one is not published")
    assert "Traceback" not in done.stderr
    assert not (run / "normalize.partial").exists() and not (run / "normalize").exists()


def test_sigterm_handling_is_left_to_a_program_that_has_its_own(monkeypatch):
    """main() called from Python: a handler the program set stays; none set, SIGTERM's default is back afterwards."""
    import signal

    from sokhan.pipeline import cli

    seen = []
    monkeypatch.setattr(cli, "_status", lambda args: seen.append(signal.getsignal(signal.SIGTERM)) or 0)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert main(["status", "--run-dir", "x"]) == 0
    assert seen == [cli._terminate] and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    def own(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, own)
    try:
        assert main(["status", "--run-dir", "x"]) == 0
        assert seen[-1] is own and signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_second_sigterm_is_not_caught(monkeypatch, capsys):
    """The first SIGTERM asks for the clean stop; the handler steps aside, so a second one kills as before instead of
    raising again inside the cleanup."""
    import os
    import signal
    import time

    from sokhan.pipeline import cli

    after = []

    def terminated(args):
        assert signal.getsignal(signal.SIGTERM) is cli._terminate  # else the signal below would end this process
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        except cli.Terminated:
            after.append(signal.getsignal(signal.SIGTERM))
            raise

    monkeypatch.setattr(cli, "_status", terminated)
    assert main(["status", "--run-dir", "x"]) == 143
    assert after == [signal.SIG_DFL] and capsys.readouterr().err.strip() == "sokhan: terminated (SIGTERM)"


def test_ctrl_c_while_the_parser_is_built_is_one_line(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr("sokhan.pipeline.cli.build_parser", interrupted)
    assert main(["status", "--run-dir", "x"]) == 130
    assert capsys.readouterr().err.strip() == "sokhan: interrupted"


def test_a_command_with_nothing_to_do_writes_nothing(tmp_path, monkeypatch):
    """On a full disk, `sokhan run` of a finished run failed writing config.json (unchanged) and left a temporary."""
    from sokhan.pipeline import stage as stage_mod

    run = tmp_path / "run"
    assert main(["run", "sample", "--run-dir", str(run), "--stages", "normalize"]) == 0

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stage_mod, "atomic_write", full)
    assert main(["run", "sample", "--run-dir", str(run), "--stages", "normalize"]) == 0
    assert sorted(p.name for p in run.iterdir()) == [".sokhan.lock", "config.json", "normalize"]


def test_a_run_dir_that_is_a_file_is_named(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["run", "sample", "--run-dir", str(afile), "--stages", "normalize"]) == 2
    assert capsys.readouterr().err.strip() == f"sokhan: error: {afile}: is a file, not a run directory"


def test_only_what_the_machine_refuses_is_a_one_liner():
    """A bug that happens while handling a missing file is a bug: its traceback stays (a reviewer's case printed
    the missing file's name for a KeyError). A full disk, a read-only folder, a file size limit are the machine's."""
    from sokhan import machine_error

    def raised(make):
        try:
            make()
        except Exception as e:  # noqa: BLE001
            return e

    def keyerror_while_handling_a_missing_file():
        try:
            open("/nonexistent/cache.json")
        except FileNotFoundError:
            {}["typo"]

    def wrapped_enospc():
        try:
            raise OSError(28, "No space left on device", "/r/x.onnx")
        except OSError as e:
            raise RuntimeError("export failed") from e

    def suppressed():
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise ValueError("another problem") from None

    assert machine_error(raised(keyerror_while_handling_a_missing_file)) is None
    assert machine_error(FileNotFoundError(2, "No such file or directory", "x")) is None
    assert machine_error(raised(suppressed)) is None
    assert machine_error(raised(wrapped_enospc)) == "/r/x.onnx: No space left on device"
    assert machine_error(OSError(30, "Read-only file system", "/r")) == "/r: Read-only file system"
    assert machine_error(Exception("Error while serializing: I/O error: No space left on device (os error 28)")) \
        == "No space left on device (os error 28)"
    assert machine_error(Exception("I/O error: No such file or directory (os error 2)")) is None


def test_an_install_without_torch_says_what_a_command_needs(tmp_path):
    """Where only the runtime is installed (the bundle README's install), `train`, `synth` and the other stages
    ended in a ModuleNotFoundError traceback, and `status` of a run with an interrupted training crashed too."""
    run = tmp_path / "run"
    assert main(["run", "sample", "--run-dir", str(run), "--stages", "normalize,tokenize,embed"]) == 0
    (run / "train.partial" / "checkpoints" / "step_000003").mkdir(parents=True)
    script = f"""
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "safetensors", "onnx"):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, NoTorch())
from sokhan.pipeline.cli import main
assert main(["status", "--run-dir", {str(run)!r}]) == 0
assert main(["train", "--run-dir", {str(run)!r}]) == 2
assert main(["synth", "--out", {str(tmp_path / "synth")!r}]) == 2
assert "torch" not in sys.modules
print("OK")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("sokhan: error:")]
    assert len(errors) == 2 and all("needs torch, which is not installed here" in e for e in errors), out.stderr
    assert "Traceback" not in out.stderr and "interrupted at step 3" in out.stdout


def test_the_run_directory_lock_is_released_when_main_returns(tmp_path):
    """In-process callers held the lock until the garbage collector ran (a reference cycle kept the file open)."""
    import fcntl
    import gc

    run = tmp_path / "run"
    gc.disable()
    try:
        assert main(["run", "sample", "--run-dir", str(run), "--stages", "normalize,tokenize,embed"]) == 0
        with open(run / ".sokhan.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while another handle holds it
    finally:
        gc.enable()


def test_a_missing_submodule_of_an_installed_package_keeps_its_traceback():
    """onnxscript 0.5.7 lacks a module torch 2.13 imports: "onnxscript is not installed here" would be false."""
    from sokhan.pipeline.cli import _missing_package

    assert _missing_package(ModuleNotFoundError("x", name="onnxscript._framework_apis.torch_2_11"), "export") is None
    assert _missing_package(ModuleNotFoundError("x", name="numpy.lib.stride_trick"), "train") is None
    assert _missing_package(ModuleNotFoundError("x", name="sokhan.pipeline.nothing"), "train") is None
