"""The stage contract: fingerprints, manifest, skip logic and atomic publication of ``RUN/<stage>/``.

A stage is a module in ``sokhan.pipeline.stages`` that defines

- ``SECTIONS``: the config sections it reads (its fingerprint covers exactly these),
- ``UPSTREAM``: the stages whose outputs it reads,
- ``run(ctx: StageContext) -> dict``: does the work, writes into ``ctx.out``, returns metrics,
- optionally ``inputs(config) -> list[Path]``: files outside the run directory it reads (the corpus),
- optionally ``RESUMABLE = True``: a killed run's ``ctx.out`` is kept for the next attempt (train), and
  ``resumable_work(partial_dir) -> bool``: whether it holds anything to resume from (checkpoints),
- optionally ``add_arguments(parser)``: flags of its own for ``sokhan <stage>``,
- optionally ``show(final_dir, args)``: what to print of its published output, after it ran or when it is up to
  date and skipped (evaluate's table). Only after publication: a print that fails (a closed pipe) must not cost
  the finished work.

The stage works in ``RUN/<stage>.partial/``. Only when ``run`` returns is ``manifest.json`` written into it and the
folder renamed to ``RUN/<stage>/``; so a killed or failed stage never leaves anything that looks finished.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

from sokhan import SokhanError, __version__
from sokhan.pipeline.config import RunConfig, fingerprint_config, to_dict

STAGES = ("normalize", "tokenize", "embed", "train", "export", "evaluate")
MANIFEST = "manifest.json"
CONFIG_FILE = "config.json"


def stage_module(name: str) -> ModuleType:
    if name not in STAGES:
        raise SokhanError(f"unknown stage {name!r} (stages: {', '.join(STAGES)})")
    return importlib.import_module(f"sokhan.pipeline.stages.{name}")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``path`` through a temporary sibling and a rename, so readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    mode = "wb" if isinstance(data, bytes) else "w"
    try:
        with open(tmp, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, say: no stray half-written sibling left beside the file
        tmp.unlink(missing_ok=True)
        raise


def json_text(obj: Any) -> str:
    """How sokhan writes JSON files: indented, UTF-8 as it is, keys in their order, a final newline."""
    return json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n"


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json_text(obj))


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SokhanError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SokhanError(f"{path}: not valid JSON ({e})") from None


def progress(iterable: Iterable | None = None, **kwargs):
    """A tqdm bar on a terminal; silent when stderr is not a TTY (CI, pipes) or SOKHAN_PROGRESS=0."""
    from tqdm.auto import tqdm

    disable = None if os.environ.get("SOKHAN_PROGRESS", "1") != "0" else True
    return tqdm(iterable, disable=disable, dynamic_ncols=True, leave=False, **kwargs)


def log(msg: str) -> None:
    try:
        print(f"[sokhan] {msg}", file=sys.stderr, flush=True)
    except BrokenPipeError:
        # stderr's reader left (`2>&1 | head -1`): the log is lost, the work goes on. Failing here, midway through
        # a stage, would drop the stage and exit 0 as if the reader had only stopped reading a finished result.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())


def _installed_version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of what produced an artefact. Reads only modules already imported, so it costs no imports."""
    out: dict[str, str | None] = {"sokhan": __version__, "python": platform.python_version()}
    for mod in ("torch", "triton", "numpy", "tokenizers", "onnx", "onnxruntime", "hazm", "jieba"):
        m = sys.modules.get(mod)
        out[mod] = (getattr(m, "__version__", None) or _installed_version(mod)) if m else None  # hazm has none

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=Path(__file__).parent, capture_output=True, text=True,
                              timeout=5).stdout.strip()

    try:
        out["git_commit"] = git("rev-parse", "HEAD") or None
        # A commit alone does not say which code ran when the checkout had changes: say that it had.
        out["git_modified"] = bool(git("status", "--porcelain", "--untracked-files=no")) if out["git_commit"] else None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = out["git_modified"] = None
    return out


@dataclass
class StageContext:
    """What a stage's ``run`` gets: the run directory, the resolved config and the folder to write into."""

    name: str
    run_dir: Path
    config: RunConfig
    out: Path
    args: argparse.Namespace = field(default_factory=argparse.Namespace)
    resumed: bool = False  # ctx.out holds a killed attempt's files (RESUMABLE stages only)

    def upstream(self, name: str) -> Path:
        """The finished output folder of an upstream stage, or a SokhanError saying which stage to run."""
        d = self.run_dir / name
        if not (d / MANIFEST).exists():
            raise SokhanError(f"{d}: stage {name!r} has not finished in this run directory; run `sokhan {name} --run-dir {self.run_dir}` first")
        return d


def _manifest(run_dir: Path, name: str) -> dict[str, Any]:
    """A finished stage's manifest, or a SokhanError saying which stage to run."""
    man = run_dir / name / MANIFEST
    if not man.exists():
        if not run_dir.is_dir():
            raise SokhanError(f"{run_dir}: no such run directory; start one with `sokhan run CONFIG --run-dir {run_dir}` "
                              "(CONFIG: sample, corpora or a TOML file of yours)")
        raise SokhanError(f"{run_dir / name}: stage {name!r} has not finished; run `sokhan {name} --run-dir {run_dir}` first (or `sokhan run`)")
    return read_json(man)


def check_current(name: str, run_dir: Path) -> None:
    """Raise a SokhanError unless stage ``name``'s output in ``run_dir`` was made from the outputs of its sources
    now there, and so, recursively, were theirs. A model trained on an older tokenizer, exported or scored with the
    new one, reads other tokens than it learned: the figures would be wrong, and parity would not see it (both sides
    get the same tokens). A source stage that is absent (removed to save space) is not checked."""
    run_dir = Path(run_dir)
    recorded = _manifest(run_dir, name).get("inputs", {}).get("upstream", {})
    for source, digest in recorded.items():
        if not (run_dir / source / MANIFEST).exists():
            continue
        if upstream_digest(_manifest(run_dir, source)) != digest:
            raise SokhanError(f"{run_dir / name}: made from an older {source} output than the one in {run_dir / source} "
                              f"({source} ran again since); run `sokhan run --run-dir {run_dir}` to bring it up to date")
        check_current(source, run_dir)


def require_trained(run_dir: Path, command: str) -> None:
    """For a command that reads a run's tokenizer and trained model (inspect, embed --inspect, evaluate --text):
    both stages finished, the model made from the tokenizer now there. ``command`` names the caller in errors."""
    run_dir = Path(run_dir)
    for name in ("tokenize", "train"):
        try:
            _manifest(run_dir, name)
        except SokhanError as e:
            raise SokhanError(f"{e} (`{command}` reads a trained model)") from None
    check_current("train", run_dir)


def ensure_dir(path: Path, what: str) -> Path:
    """``path`` as a folder to write into, made if needed, or a SokhanError naming ``what`` (the flag)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise SokhanError(f"{what} {path}: is a file, not a folder") from None
    except OSError as e:
        raise SokhanError(f"{what} {path}: cannot make this folder ({e.strerror or e})") from None
    try:  # an existing folder may still refuse writes (read-only): say so now, not after the work
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise SokhanError(f"{what} {path}: cannot write into this folder ({e.strerror or e})") from None
    return path


def check_upstream(name: str, run_dir: Path) -> None:
    """``check_current`` for every stage that ``name`` reads from (a missing one is the fingerprint's error)."""
    for up in stage_module(name).UPSTREAM:
        if (Path(run_dir) / up / MANIFEST).exists():
            check_current(up, run_dir)


def upstream_digest(manifest: dict[str, Any]) -> str:
    """What a later stage's fingerprint records of a stage's output: the hash of its files, less the reports that
    stage names in its manifest (``REPORTS``: plots, neighbour lists; no stage reads them), so that redrawing a
    plot does not make training stale. A manifest from before the field counts every file, as it did then."""
    reports = set(manifest.get("reports", ()))
    return sha256_json({k: v for k, v in manifest["outputs"].items() if k not in reports})


def _fingerprint(name: str, mod: ModuleType, config: RunConfig, run_dir: Path) -> tuple[str, dict[str, Any]]:
    """What the stage's result depends on: its config sections, upstream outputs and input files."""
    inputs: dict[str, Any] = {
        "stage": name,
        "config": fingerprint_config(config, mod.SECTIONS),
        "upstream": {},
        "files": {},
    }
    for up in mod.UPSTREAM:
        inputs["upstream"][up] = upstream_digest(_manifest(run_dir, up))
    if hasattr(mod, "inputs"):
        for p in mod.inputs(config):
            inputs["files"][str(p)] = sha256_file(p)
    return sha256_json(inputs), inputs


def status(name: str, config: RunConfig, run_dir: Path) -> str:
    """``done`` (up to date), ``stale`` (inputs or config changed), ``missing`` or ``blocked`` (upstream missing)."""
    if not (run_dir / name / MANIFEST).exists():
        return "missing"
    try:
        fp, _ = _fingerprint(name, stage_module(name), config, run_dir)
    except SokhanError:
        return "blocked"
    return _state(run_dir / name / MANIFEST, fp)


def _state(manifest: Path, fp: str | None) -> str:
    """``status`` from a stage's manifest path and its fingerprint now (None: an upstream is missing)."""
    if not manifest.exists():
        return "missing"
    if fp is None:
        return "blocked"
    try:
        return "done" if read_json(manifest).get("fingerprint") == fp else "stale"
    except SokhanError:  # a damaged manifest: run_stage redoes the stage
        return "stale"


def describe(config: RunConfig, run_dir: Path) -> list[dict[str, Any]]:
    """Per stage, in order, what ``sokhan run`` would do with ``config``, without running anything: ``state``
    (``status``; a stage whose upstream will run again is ``stale`` too; ``interrupted`` for a stage never finished
    that left checkpoints), ``why`` (what changed, which upstream runs first, or whether an interrupted run would be
    resumed), ``finished_at`` and ``wall_time_s`` of its output."""
    from sokhan.pipeline.config import ADDED_LATER

    run_dir = Path(run_dir)
    unset = object()
    rows: list[dict[str, Any]] = []
    reports_only: set[str] = set()  # stale stages that will rewrite only their reports (embed.plot_tokens)
    for name in STAGES:
        try:  # computed once: it hashes the corpus files for normalize
            fp, now = _fingerprint(name, stage_module(name), config, run_dir)
        except SokhanError:
            fp, now = None, {}
        state = _state(run_dir / name / MANIFEST, fp)
        row: dict[str, Any] = {"stage": name, "state": state, "why": None, "finished_at": None, "wall_time_s": None}
        try:
            man = read_json(run_dir / name / MANIFEST) if state != "missing" else {}
        except SokhanError:
            man, row["why"] = {}, "its manifest.json is damaged"
        row["finished_at"], row["wall_time_s"] = man.get("finished_at"), man.get("wall_time_s")
        # Upstream stages that `sokhan run` would run first (a blocked one cannot run: it changes nothing).
        ups = [u for u in stage_module(name).UPSTREAM if u not in reports_only
               and next(r for r in rows if r["stage"] == u)["state"] in ("stale", "missing", "interrupted")]
        if state == "stale" and man:
            current = {k: v for k, v in now.items() if k != "stage"}
            recorded = {
                "config": {s: {k: v for k, v in values.items() if ADDED_LATER.get((s, k), unset) != v}
                           for s, values in man.get("config", {}).items()},
                **man.get("inputs", {}),
            }
            row["why"] = _changes(recorded, current)
            old, new = _flat(recorded), _flat(current)
            changed = {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
            report_keys = {f"config.{key}" for key in getattr(stage_module(name), "REPORT_KEYS", ())}
            if changed and changed <= report_keys and "reports" in man:  # (older manifests hashed the reports too)
                reports_only.add(name)
            if ups:
                row["why"] += f"; after {', '.join(ups)}"
        elif state == "blocked" or (state == "done" and ups):  # up to date now, but its inputs will change
            row["state"] = "stale" if state == "done" else state
            row["why"] = f"after {', '.join(ups)}" if ups else None
        partial = run_dir / f"{name}.partial"
        step = getattr(stage_module(name), "resumable_step", lambda p: None)(partial) if partial.is_dir() else None
        if step is not None and row["state"] != "done":  # an interrupted run with checkpoints (training)
            stamp = partial / ".fingerprint"
            row["state"] = "interrupted" if row["state"] == "missing" else row["state"]
            if stamp.exists() and stamp.read_text().strip() == fp:
                row["why"] = f"interrupted at step {step}: `sokhan run` resumes it"
            else:
                row["why"] = (f"interrupted at step {step} under other settings "
                              f"({_changes(partial / '.fingerprint.json', now)}): `sokhan run` discards it")
        elif step is not None:  # done, beside an interrupted run that `sokhan run` leaves alone (12 MB on the sample)
            stamp = partial / ".fingerprint"
            same = stamp.exists() and stamp.read_text().strip() == fp
            row["why"] = (f"{partial.name} holds a rerun interrupted at step {step} (--force): another --force "
                          "starts it over" if same else
                          f"{partial.name} holds a run interrupted at step {step} under other settings: resumed if "
                          "you run with them again")
        rows.append(row)
    return rows


def _has_work(mod, partial: Path, stamps: tuple[Path, ...]) -> bool:
    """Whether a failed resumable stage left work to resume: what the stage says counts (``resumable_work``:
    training's checkpoints, not its first lines of metrics), else anything besides the stamps."""
    check = getattr(mod, "resumable_work", None)
    return check(partial) if check else any(p not in stamps for p in partial.iterdir())


def run_stage(
    name: str,
    config: RunConfig,
    run_dir: Path,
    force: bool = False,
    args: argparse.Namespace | None = None,
) -> dict[str, Any]:
    """Run one stage unless it is up to date; returns its manifest."""
    mod = stage_module(name)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / name
    fp, inputs = _fingerprint(name, mod, config, run_dir)
    worker = int(os.environ.get("RANK", "0")) != 0  # a torchrun process other than the first: it says nothing
    say = (lambda msg: None) if worker else log
    if not force and (final / MANIFEST).exists():
        try:
            manifest = read_json(final / MANIFEST)
        except SokhanError as e:  # damaged by hand or by a disk: the stage is redone, not trusted
            say(f"{name}: {e}; running it again")
            manifest = {}
        if manifest.get("fingerprint") == fp:
            say(f"{name}: up to date, skipped (--force reruns it)")
            if hasattr(mod, "show") and not worker:  # a result to read (evaluate's table) is shown again
                mod.show(final, args or argparse.Namespace())
            return manifest
        say(f"{name}: inputs or config changed since the last run, running again")

    partial = run_dir / f"{name}.partial"
    if worker:
        # A torchrun worker: rank 0 prepares, fills and publishes the folder; this process only computes.
        if not getattr(mod, "DISTRIBUTED", False):
            raise SokhanError(f"stage {name!r} does not run under torchrun; run it in one process first")
        ctx = StageContext(name=name, run_dir=run_dir, config=config, out=partial, args=args or argparse.Namespace())
        return {"stage": name, "metrics": mod.run(ctx) or {}}
    check_upstream(name, run_dir)
    resumable = getattr(mod, "RESUMABLE", False)
    want_resume = resumable and getattr(args, "resume", False)
    if want_resume and force:
        raise SokhanError("--resume and --force contradict each other: --force starts afresh")
    stamp, stamp_inputs = partial / ".fingerprint", partial / ".fingerprint.json"
    resumed = resumable and not force and stamp.exists() and stamp.read_text().strip() == fp
    if not resumed and partial.exists():
        if resumable and (stamp.exists() or want_resume):
            why = ("--force" if force else f"changed since: {_changes(stamp_inputs, inputs)}") if stamp.exists() \
                else "it records no config to check this one against"
            if want_resume:  # the user asked to keep this work: refuse before deleting anything
                raise SokhanError(f"--resume: the interrupted run in {partial} cannot be resumed ({why}); nothing was "
                                  "deleted: run with the config it had, or without --resume to start afresh")
            log(f"{name}: discarding the interrupted run in {partial} ({why}); starting afresh")
        shutil.rmtree(partial)
    try:
        partial.mkdir(parents=True, exist_ok=True)
        atomic_write(stamp_inputs, json.dumps(inputs, sort_keys=True, ensure_ascii=False))
        atomic_write(stamp, fp)
    except BaseException:  # a full disk before any work: no empty partial folder left behind
        if not resumed:
            shutil.rmtree(partial, ignore_errors=True)
        raise

    ctx = StageContext(name=name, run_dir=run_dir, config=config, out=partial, args=args or argparse.Namespace(), resumed=resumed)
    log(f"{name}: running" + (" (resuming)" if resumed else ""))
    t0 = time.time()
    try:
        metrics = mod.run(ctx) or {}
    except BaseException:
        # A resumable stage keeps its work (checkpoints) for the next attempt; others, or one that failed before it
        # wrote anything, leave nothing behind.
        if not resumable or not partial.exists() or not _has_work(mod, partial, (stamp, stamp_inputs)):
            shutil.rmtree(partial, ignore_errors=True)
        raise
    wall = time.time() - t0

    try:
        outputs = {
            str(p.relative_to(partial)): sha256_file(p)
            for p in sorted(partial.rglob("*"))
            if p.is_file() and p.name != MANIFEST and p not in (stamp, stamp_inputs)
        }
        full_config = to_dict(config)  # in full, with the keys the fingerprint leaves out
        manifest = {
            "stage": name,
            "fingerprint": fp,
            "config": {s: full_config[s] for s in mod.SECTIONS},
            "inputs": {"upstream": inputs["upstream"], "files": inputs["files"]},
            "outputs": outputs,
            **({"reports": list(mod.REPORTS)} if getattr(mod, "REPORTS", ()) else {}),
            "metrics": metrics,
            "versions": versions(),
            "wall_time_s": round(wall, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(partial / MANIFEST, manifest)
    except BaseException:
        # The work is done but not published (a full disk, say). A resumable stage keeps it with its stamps, so the
        # next attempt resumes it (training: from its last checkpoint) instead of taking it for another config's.
        if not resumable:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    # The stamps go only now, with the manifest written: without them a finished partial would read as foreign work.
    stamp.unlink()
    stamp_inputs.unlink()
    old = run_dir / f".{name}.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)
    log(f"{name}: done in {wall:.1f}s -> {final}")
    if hasattr(mod, "show"):
        mod.show(final, args or argparse.Namespace())
    return manifest


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {"a.b.c": value}."""
    if not isinstance(d, dict):
        return {prefix: d}
    return {k: v for key, val in d.items() for k, v in _flat(val, f"{prefix}.{key}" if prefix else key).items()}


def _changes(recorded: Path | dict[str, Any], now: dict[str, Any], most: int = 3) -> str:
    """What differs between the fingerprint inputs ``recorded`` (or stored in that file) and ``now``, as
    'key: old → new' items."""

    try:
        old = _flat(recorded if isinstance(recorded, dict) else json.loads(recorded.read_text(encoding="utf-8")))
    except (OSError, ValueError):  # a partial folder from before this file was written
        return "its config or inputs differ from this run's"
    new = _flat(now)
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    items = []
    for k in keys[:most]:
        label = k.removeprefix("config.").removeprefix("upstream.").removeprefix("files.")
        if k.startswith("upstream."):
            items.append(f"{label}'s output")
        elif k.startswith("files."):
            items.append(f"{label} (its content)")
        else:
            items.append(f"{label}: {old.get(k, '(unset)')} → {new.get(k, '(unset)')}")
    if not keys:  # the same inputs under another fingerprint: the fingerprint's own recipe changed
        return "its fingerprint, though not its recorded inputs"
    return ", ".join(items) + (f" and {len(keys) - most} more" if len(keys) > most else "")


LOCK_FILE = ".sokhan.lock"


def lock_run_dir(run_dir: Path, required: bool = True):
    """Hold ``RUN/.sokhan.lock`` for the rest of this process, or a SokhanError if another command holds it.

    Two commands working in one run directory would trample each other's partial folders (one resuming the
    checkpoints the other is writing). The lock is an advisory ``flock``, released by the kernel when the process
    ends however it ends, so a killed command never leaves a stale lock. Returns the open file (keep it alive).
    Where ``fcntl`` does not exist (Windows), nothing is locked. A lock file that cannot be written (a read-only
    run directory) is a SokhanError, or with ``required`` False (commands that only read) no lock: None."""
    try:
        import fcntl
    except ImportError:
        return None
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise SokhanError(f"{run_dir}: is a file, not a run directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / LOCK_FILE, "a+")
    except OSError as e:
        if not required:
            return None
        raise SokhanError(f"{run_dir}: cannot write its lock file {LOCK_FILE} ({e.strerror or e})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise SokhanError(f"{run_dir}: another sokhan command is working in this run directory ({holder}); "
                          "wait for it to finish or stop it") from None
    try:  # who holds it, for the message a second command gets; the lock itself is the flock
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
    except OSError:  # a full disk: the lock holds all the same
        pass
    return handle


def kept_work(name: str, run_dir: Path, since: float) -> bool:
    """Whether stage ``name`` started (or resumed) at or after ``since`` and left work to resume from: its partial
    folder's stamp is that recent and, where the stage says what counts (``resumable_work``), the work is there."""
    partial = Path(run_dir) / f"{name}.partial"
    stamp = partial / ".fingerprint"
    if not stamp.exists() or stamp.stat().st_mtime < since:
        return False
    check = getattr(stage_module(name), "resumable_work", None)
    return check(partial) if check else True


def save_run_config(run_dir: Path, config: RunConfig) -> None:
    """Write ``RUN/config.json``; unchanged, it is not written (a command with nothing to do then works on a
    full disk)."""
    path = Path(run_dir) / CONFIG_FILE
    text = json_text(to_dict(config))
    if path.is_file() and path.read_text(encoding="utf-8", errors="replace") == text:
        return
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)


def stored_config(run_dir: Path) -> dict[str, Any] | None:
    p = Path(run_dir) / CONFIG_FILE
    return read_json(p) if p.exists() else None
