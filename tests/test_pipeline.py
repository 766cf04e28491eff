"""The whole pipeline through the CLI on the bundled sample, for both architectures, in miniature."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from sokhan.pipeline.cli import main
from sokhan.pipeline.stage import STAGES

# Every stage at its smallest: this checks the wiring, not the model quality (benchmarks and the README do that).
TINY = [
    "train.steps=6", "train.batch_size=4", "train.seq_len=32", "train.eval_every=3", "train.eval_batches=1",
    "train.ckpt_every=3", "train.warmup_steps=1", "export.parity_steps=4", "export.parity_prompt_tokens=8",
    "evaluate.max_tokens=300", "evaluate.nextword_words=5", "evaluate.ngram_order=3",
]


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def front_end(tmp_path_factory):
    """normalize + tokenize on the sample once; each architecture continues from a copy."""
    run = tmp_path_factory.mktemp("front") / "run"
    assert main(["run", "sample", "--run-dir", str(run), "--stages", "normalize,tokenize", *_sets(TINY)]) == 0
    return run


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mamba", "transformer"])
def test_sample_runs_end_to_end_and_reruns_nothing(front_end, tmp_path, arch, capsys):
    run = tmp_path / arch
    shutil.copytree(front_end, run)
    args = ["run", "sample", "--run-dir", str(run), *_sets([*TINY, f"model.arch={arch}"])]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "normalize: up to date, skipped" in err and "tokenize: up to date, skipped" in err
    for stage in STAGES:
        assert json.loads((run / stage / "manifest.json").read_text())["stage"] == stage
    assert not list(run.glob("*.partial"))

    parity = json.loads((run / "export" / "bundle" / "parity.json").read_text())
    assert parity["passed"] and parity["tokens_identical"]
    report = json.loads((run / "evaluate" / "report.json").read_text())
    assert set(report["languages"]) >= {"fa", "zh", "en"}

    assert main(args) == 0
    err = capsys.readouterr().err
    assert all(f"{stage}: up to date, skipped" in err for stage in STAGES)
    assert main(["status", "--run-dir", str(run), "--check"]) == 0  # nothing left for `sokhan run` to do

    # The bundle alone, through the CLI.
    out = subprocess.run(
        [sys.executable, "-m", "sokhan", "generate", "--bundle", str(run / "export" / "bundle"),
         "--prompt", "در جنگل یک شیر", "--max-new-tokens", "5"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("در جنگل یک شیر")
