"""Peak memory and wall time of the normalize and tokenize stages, and of counting the n-gram baseline, against the
size of the corpus.

    python benchmarks/stage_memory.py                    # the corpora 1 and 10 times over (≈ 2 min)
    python benchmarks/stage_memory.py --copies 1 10 40   # and 40 times over (150 MB of text; ≈ 6 min more)

The corpus is ``../shared/corpora`` (Persian, Chinese, English) repeated ``--copies`` times per language, with
``normalize.dedupe = false`` so the copies are kept, and the stages' default settings otherwise (vocabulary 8000,
one segmentation process per core). Each stage runs as ``sokhan <stage>`` in a fresh process; its peak resident
memory is that of the largest process it ran (``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a wrapper around it: the
stage, or one of its segmentation workers, which are forked from it and count their shared pages too). Memory that
stays flat as the corpus grows is the claim: the stages stream lines through disk, holding the vocabulary's
statistics and a chunk of lines, not the corpus. Then the evaluate stage's n-gram baseline is counted on the
training shard twice, in a fresh process each: as the stage does (at most ``evaluate.ngram_max_tokens``, sampled in
whole lines past that) and on every token, as it did before the cap. Writes ``benchmarks/out/stage_memory.json``
and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_cli import positive, run

from sokhan import SokhanError
from sokhan.pipeline.stage import write_json

OUT = Path(__file__).resolve().parent / "out"
ROOT = Path(__file__).resolve().parent.parent
LANGS = ("fa", "zh", "en")
# Runs the command given and prints the largest resident set size among the processes it waited for, in kB.
# Counts the n-gram baseline on a tokenize folder's training shard (argv: folder, token limit), as evaluate does.
_NGRAM = """
import sys
from pathlib import Path
from sokhan.pipeline.ngram import KneserNey
from sokhan.pipeline.stages.evaluate import EvaluateConfig, _train_tokens, ngram_sample
from sokhan.pipeline.stages.tokenize import read_meta
folder, limit = Path(sys.argv[1]), int(sys.argv[2])
meta = read_meta(folder)
tokens = ngram_sample(_train_tokens(folder, meta), limit, meta["special_tokens"]["<|eos|>"])
KneserNey(EvaluateConfig().ngram_order, meta["vocab_size"]).fit(tokens)
print(len(tokens))
"""
_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def build_corpus(corpora: Path, copies: int, out: Path) -> int:
    """Each language's corpus files, ``copies`` times over, in ``out/<lang>.txt``; returns the bytes written."""
    total = 0
    for lang in LANGS:
        files = sorted((corpora / lang).glob("*.txt"))
        if not files:
            raise SokhanError(f"{corpora / lang}: no *.txt files (the corpora sit beside the checkout in ../shared/corpora)")
        with open(out / f"{lang}.txt", "wb") as f:
            for _ in range(copies):
                for path in files:
                    data = path.read_bytes()
                    f.write(data if data.endswith(b"\n") else data + b"\n")
        total += (out / f"{lang}.txt").stat().st_size
    return total


def measure(label: str, cmd: list[str]) -> tuple[float, float, list[str]]:
    """(wall seconds, peak RSS in MB, the lines ``cmd`` printed) of ``cmd`` run to completion; a failure ends the
    benchmark with its error."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True,
                          env={**__import__("os").environ, "SOKHAN_PROGRESS": "0"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SokhanError(f"{label} failed: {last}")
    *printed, rss = proc.stdout.strip().splitlines()
    return wall, int(rss) / 1024, printed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--copies", type=positive, nargs="+", default=[1, 10], help="corpus sizes, in copies of the corpora")
    p.add_argument("--corpora", type=Path, default=ROOT.parent / "shared" / "corpora")
    args = p.parse_args()
    sokhan = [sys.executable, "-m", "sokhan.pipeline.cli"]
    rows = []
    for copies in args.copies:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            (tmp / "corpus").mkdir()
            size = build_corpus(args.corpora, copies, tmp / "corpus")
            config = "".join(f'[[corpus.paths]]\npath = "corpus/{lang}.txt"\nlang = "{lang}"\n\n' for lang in LANGS)
            (tmp / "config.toml").write_text(config + "[normalize]\ndedupe = false\n", encoding="utf-8")
            row = {"copies": copies, "corpus_mb": size / 1e6}
            for stage in ("normalize", "tokenize"):
                wall, rss, _ = measure(stage, [*sokhan, stage, "--run-dir", str(tmp / "run"), "--config", str(tmp / "config.toml")])
                row[stage] = {"wall_s": round(wall, 2), "peak_rss_mb": round(rss, 1), "mb_per_s": round(size / 1e6 / wall, 2)}
            row["train_tokens"] = json.loads((tmp / "run" / "tokenize" / "meta.json").read_text())["tokens"]["train"]
            from sokhan.pipeline.stages.evaluate import EvaluateConfig

            for name, limit in (("ngram", EvaluateConfig().ngram_max_tokens), ("ngram_all_tokens", 2**62)):
                wall, rss, printed = measure(name, [sys.executable, "-c", _NGRAM, str(tmp / "run" / "tokenize"), str(limit)])
                row[name] = {"wall_s": round(wall, 2), "peak_rss_mb": round(rss, 1), "tokens_counted": int(printed[-1])}
            shutil.rmtree(tmp / "run")
        rows.append(row)
        print(f"copies {copies}: {row}", file=sys.stderr)

    OUT.mkdir(parents=True, exist_ok=True)
    write_json(OUT / "stage_memory.json", {"python": sys.version.split()[0], "rows": rows})
    print("Peak RSS in MB (wall clock in s)\n")
    print("| copies | corpus (MB) | training tokens | normalize | tokenize | n-gram as evaluate counts it | n-gram on every token |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [f"{r[k]['peak_rss_mb']:.0f} ({r[k]['wall_s']:.1f})" for k in ("normalize", "tokenize", "ngram", "ngram_all_tokens")]
        print(f"| {r['copies']} | {r['corpus_mb']:.1f} | {sum(r['train_tokens'].values()):,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    run(main)
