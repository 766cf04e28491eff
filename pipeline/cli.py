"""The ``sokhan`` command: ``run`` (all stages in order), one subcommand per stage, and the tools around them.

Importing this module must stay cheap and torch-free: ``sokhan generate`` and ``sokhan predict`` run from an
exported bundle on a machine without torch. Building the parser imports every stage and tool module (each adds
its own options), so their top level must stay torch-free too; a test runs ``predict`` with torch unimportable.
What a command needs beyond that (torch, hazm, jieba) is imported only when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import sys
import time
from pathlib import Path

from sokhan import SokhanError, __version__, machine_error, raised_from

STAGE_HELP = {
    "normalize": "clean and unify the corpus per language (hazm, NFKC, jieba-safe width folding)",
    "tokenize": "train the subword tokenizer on language-aware segmentation; encode token shards",
    "embed": "initialise the token-embedding table (normal or PPMI-SVD) and plot it",
    "train": "train the transformer or Mamba model",
    "export": "export the one-token decode step to ONNX and check parity with PyTorch",
    "evaluate": "perplexity, bits per character and next-word accuracy beside an n-gram baseline",
}

# Commands that are not stages: name -> (module with add_arguments(parser) and main(args) -> int, help).
TOOLS = {
    "generate": ("sokhan.export.cli", "generate text from an exported bundle (no torch needed)"),
    "predict": ("sokhan.export.cli", "most likely next words from an exported bundle (no torch needed)"),
    "synth": ("sokhan.pipeline.synth", "selective copying / induction heads: what selectivity buys"),
    "inspect": ("sokhan.pipeline.inspect", "attention maps (transformer) or Δ heatmaps (Mamba) for a text"),
}


def _common(p: argparse.ArgumentParser, run_dir_required: bool) -> None:
    p.add_argument("--run-dir", type=Path, required=run_dir_required, default=None,
                   help="the run directory (default: runs/<the config's name>, runs/sample without one)"
                   if not run_dir_required else "the run directory")
    p.add_argument("--config", default=None,
                   help="a TOML config or preset name; default: the config stored in the run directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set train.steps=200")
    p.add_argument("--force", action="store_true", help="rerun even if up to date")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sokhan", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--version", action="version", version=f"sokhan {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run the stages in order (skipping those up to date)")
    p.add_argument("config_file", nargs="?", default=None, metavar="CONFIG",  # a str: ./sample is not the preset sample
                   help="TOML config or preset name (default: the run directory's stored config, else 'sample')")
    _common(p, run_dir_required=False)
    p.add_argument("--stages", default=None, help="comma-separated subset, e.g. normalize,tokenize (default: all)")

    p = sub.add_parser("status", help="what `sokhan run` would do, running nothing: each stage done, stale (and why) or missing")
    p.add_argument("--run-dir", type=Path, required=True, help="the run directory")
    p.add_argument("--config", default=None,
                   help="a TOML config or preset name; default: the config stored in the run directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="see what this override would rerun (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when `sokhan run` would do anything (a stage not done), 0 when all are: for scripts")

    for name, help_ in STAGE_HELP.items():
        p = sub.add_parser(name, help=help_)
        _common(p, run_dir_required=True)
        p.set_defaults(stage=name)
        from sokhan.pipeline import stage as _stage  # cheap: no torch

        mod = _stage.stage_module(name)
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(p)

    for name, (module, help_) in TOOLS.items():
        p = sub.add_parser(name, help=help_)
        p.set_defaults(tool=module)
        importlib.import_module(module).add_arguments(p, name)
    return parser


def _resolve_config(args: argparse.Namespace):
    from sokhan.pipeline.config import load_config
    from sokhan.pipeline.stage import stored_config

    if args.command == "run" and args.config_file is not None and args.config is not None:
        raise SokhanError(f"run: give the config once, as CONFIG ({args.config_file}) or --config ({args.config}), not both")
    path = args.config if args.command != "run" else (args.config_file or args.config)
    base = stored_config(args.run_dir) if path is None else None
    if path is None and base is None:
        if args.command != "run":
            raise SokhanError(f"{args.run_dir}: no config.json here; pass --config CONFIG.toml or start with `sokhan run`")
        path = "sample"
    return load_config(path, args.overrides, base=base)


def _took(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _status(args: argparse.Namespace) -> int:
    import json

    from sokhan.pipeline.stage import describe

    rows = describe(_resolve_config(args), args.run_dir)
    # Like `make -q`: 1 means there is work to do, 2 (SokhanError) that the question could not be answered.
    code = 1 if args.check and any(r["state"] != "done" for r in rows) else 0
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return code
    table = [("stage", "state", "finished", "took", "why")] + [
        (r["stage"], r["state"], (r["finished_at"] or "")[:19].replace("T", " "),
         _took(r["wall_time_s"]), r["why"] or "") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print(("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4]).rstrip())
    return code


def _run(args: argparse.Namespace) -> int:
    """A stage command, under the run directory's lock, which is released as the command ends: closed here, not
    left to the garbage collector (a caller of ``main`` in-process held it until a collection ran)."""
    locks: list = []
    try:
        return _run_locked(args, locks)
    finally:
        for handle in locks:
            if handle is not None:  # no lock: a read-only run directory, or no fcntl
                handle.close()


def _run_locked(args: argparse.Namespace, locks: list) -> int:
    from sokhan.pipeline.stage import (CONFIG_FILE, LOCK_FILE, STAGES, atomic_write, kept_work, lock_run_dir,
                                       run_stage, save_run_config, stage_module)

    if args.command == "run" and args.run_dir is None:
        # `sokhan run my.toml` works in runs/my, `sokhan run corpora` in runs/corpora: a run named for its config,
        # never another config's run (runs/sample for all of them took over the sample's run).
        named = args.config_file or args.config
        args.run_dir = Path("runs") / (Path(named).stem if named is not None else "sample")
    config = _resolve_config(args)
    if args.command == "run":
        names = STAGES if not args.stages else [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [s for s in names if s not in STAGES]
        if unknown:
            raise SokhanError(f"--stages: unknown stage {unknown[0]!r} (stages: {', '.join(STAGES)})")
    # A stage may answer some of its flags itself, outside the runner (evaluate --text prints; embed --inspect
    # writes into RUN/train): under the lock too, but they never make a run directory that does not exist.
    # A read-only run directory still serves evaluate --text (no lock then).
    first = int(os.environ.get("RANK", "0")) == 0  # torchrun's other processes work under the first one's lock
    direct = None if args.command == "run" else getattr(stage_module(args.stage), "direct", None)
    lock = None
    if first and direct is not None and Path(args.run_dir).is_dir():
        lock = lock_run_dir(args.run_dir, required=False)
        locks.append(lock)
    if direct is not None and direct(args, config):
        return 0
    fresh = not Path(args.run_dir).exists()  # this command makes the run directory
    if first and lock is None:
        lock = lock_run_dir(args.run_dir)  # held while this command runs
        locks.append(lock)
    if args.command != "run":
        names = [args.stage]
    # The run's config is saved before the stages run, so that an interrupted stage resumes under the same config
    # when it is rerun without the --set flags. A command that fails and keeps nothing made under this config (a
    # stage it published, work to resume) puts the previous config back, so that a rejected --set is not inherited
    # by the next command.
    path = Path(args.run_dir) / CONFIG_FILE
    previous = path.read_bytes() if path.exists() else None
    started = time.time()
    save_run_config(args.run_dir, config)
    before = {name: _published_as(args.run_dir, name) for name in names}
    try:
        for name in STAGES:
            if name in names:
                run_stage(name, config, args.run_dir, force=args.force, args=args)
    except (KeyboardInterrupt, BrokenPipeError):  # BrokenPipe: stdout's reader left after evaluate published its table
        raise
    except BaseException:
        # Stages published under this config stay, and so must the config: put back, the previous one (or none, in
        # a first run) would describe other outputs, and the next `sokhan run` redid them under the sample preset.
        # (Compared here, not after each stage: a stage can fail after publishing, printing its table to a full disk.)
        published = [name for name in names if _published_as(args.run_dir, name) != before[name]]
        if published or any(kept_work(name, args.run_dir, started) for name in names):
            raise  # or a resumable stage started (or resumed) under this config and kept its checkpoints
        if previous is None:
            path.unlink(missing_ok=True)
        else:
            atomic_write(path, previous)
        run_dir = Path(args.run_dir)
        if fresh and [p.name for p in run_dir.iterdir()] in ([], [LOCK_FILE]):
            # A first command that failed (a config or corpus error) leaves no folder holding only its lock file.
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
            run_dir.rmdir()
        raise
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a batch scheduler's time limit, torchrun stopping its other processes), raised like Ctrl-C's
    KeyboardInterrupt so that a command stops the same clean way: a stage's half-written folder removed, a training
    run's checkpoints kept. Its default action killed the process on the spot and left the partial folder."""


def _terminate(signum, frame) -> None:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once: the clean stop is asked once
    raise Terminated()


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM raises ``Terminated`` while a command runs, unless the program around it (``main`` called from Python)
    handles SIGTERM itself; signal handlers can only be set from the main thread."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _published_as(run_dir: Path, name: str) -> tuple[int, int] | None:
    """Which publication of stage ``name`` is in place: its manifest's inode and mtime (a stage is published by
    renaming a new folder into place, so the manifest is a new file each time), or None."""
    from sokhan.pipeline.stage import MANIFEST

    try:
        st = (Path(run_dir) / name / MANIFEST).stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _interruption(e: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C (or SIGTERM) behind ``e``: ``e`` itself, or what it was raised while handling: a library caught
    the KeyboardInterrupt midway (torch.onnx's exporter wraps it in a TorchExportError with a hundred lines of
    traceback)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _stopped(stop: KeyboardInterrupt, stages: bool) -> int:
    """The line and exit status of a command stopped by Ctrl-C (130) or SIGTERM (143, 128 + the signal, as a shell
    reports a process it killed)."""
    what = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
    kept = "; finished stages are kept, the interrupted one is not published" if stages else ""
    print(f"sokhan: {what}{kept}", file=sys.stderr)
    return 143 if isinstance(stop, Terminated) else 130


# What only a full install has: an install for `generate` and `predict` alone (the bundle README's) has numpy,
# onnxruntime and the tokenizer's packages (tokenizers, jieba, hazm).
FULL_INSTALL = frozenset({"torch", "triton", "onnx", "onnxscript", "safetensors", "matplotlib", "scipy", "sklearn",
                          "arabic_reshaper", "bidi", "tqdm"})


def _missing_package(e: BaseException, command: str) -> str | None:
    """One line for a command that needs a package this environment lacks, instead of a ModuleNotFoundError
    (also one raised while an earlier error was handled)."""
    missing = next((x for x in raised_from(e) if isinstance(x, ModuleNotFoundError) and x.name), None)
    if missing is None:
        return None
    package = missing.name.split(".")[0]
    if package not in FULL_INSTALL | {"numpy", "onnxruntime", "tokenizers", "jieba", "hazm"}:
        return None  # sokhan's own modules, typos: bugs, with their traceback
    try:  # installed, with a submodule missing (a release too old, a typo): not this message either
        if package in sys.modules or importlib.util.find_spec(package) is not None:
            return None
    except (ImportError, ValueError):
        pass
    if package in FULL_INSTALL and command not in ("generate", "predict"):
        return (f"`sokhan {command}` needs {package}, which is not installed here: this looks like an install for "
                "generate and predict only; install sokhan with its dependencies for the other commands")
    return f"`sokhan {command}` needs {package}, which is not installed here (pip install {package})"


def _utf8_output() -> None:
    """Persian and Chinese go to stdout and stderr as UTF-8 whatever the locale says (Python's own choice for the C
    locale): under a Latin-1 one, printing a Persian word or an arrow was a UnicodeEncodeError after the work."""
    if os.environ.get("PYTHONIOENCODING"):  # the user's own choice stands
        return
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        if encoding != "utf8" and hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8", errors="replace")


def main(argv: list[str] | None = None) -> int:
    _utf8_output()
    with _sigterm_interrupts():
        try:
            code = _main(argv)
        except BaseException:
            if _group_left():
                import traceback

                traceback.print_exc()  # a bug: its traceback, then the same exit as below
                _exit_now(1)
            raise
    if _group_left():
        _exit_now(code)
    return code


def _group_left() -> bool:
    """Whether this is a torchrun process whose process group is still up: it failed or was stopped, and training's
    teardown skipped the barrier its peers would never reach, and so the group's destruction."""
    dist = sys.modules.get("torch.distributed")  # never imported here: this module stays torch-free
    if dist is None or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    return dist.is_available() and dist.is_initialized()


def _exit_now(code: int) -> None:
    """End the process, its message printed, without Python's shutdown: with gloo's threads still running, that
    shutdown aborted now and then ("terminate called without an active exception", exit 134 and a core file)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main(argv: list[str] | None) -> int:
    try:
        parser = build_parser()  # imports numpy and the stages' configs: a Ctrl-C can land here too
    except KeyboardInterrupt as stop:
        return _stopped(stop, stages=False)
    args = parser.parse_args(argv)
    stages = not getattr(args, "tool", None) and args.command != "status"
    try:
        if getattr(args, "tool", None):
            return importlib.import_module(args.tool).main(args) or 0
        if args.command == "status":
            return _status(args)
        return _run(args)
    except SokhanError as e:
        print(f"sokhan: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # `sokhan status … | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except BaseException as e:
        stop = _interruption(e)
        if stop is None:
            missing = _missing_package(e, args.command)
            if missing is not None:
                print(f"sokhan: error: {missing}", file=sys.stderr)
                return 2
            problem = machine_error(e) if isinstance(e, Exception) else None
            if problem is None:
                raise
            kept = "; finished stages are kept" if stages else ""
            print(f"sokhan: error: {problem}{kept}", file=sys.stderr)
            return 1
        return _stopped(stop, stages)


if __name__ == "__main__":
    raise SystemExit(main())
