"""evaluate stage: next-word prediction on held-out text beside a Kneser-Ney n-gram baseline.

``sokhan evaluate --run-dir RUN`` scores the held-out lines (``RUN/tokenize/val/<lang>.txt``) with the trained
model and with an interpolated modified Kneser-Ney n-gram model counted on ``RUN/tokenize/train.bin``, prints a
table and writes ``RUN/evaluate/report.json`` and ``report.md``.

``--text FILE [--lang fa|zh|en]`` (repeatable) or ``--bundle DIR`` evaluate outside the stage runner: the run
directory is only read, the table (or with ``--json`` the report) goes to stdout, nothing is written. Texts are
normalized and tokenized with the run's tokenizer; without ``--lang`` each line's language is detected.
``--bundle`` adds the agreement of the exported ONNX decoder with PyTorch on the same tokens.

What the figures mean (also written into the report): see ``sokhan.pipeline.scoring``. In short, every token
but the ``<|lang:xx|>`` tags is predicted, ``<|eos|>`` included, and a line's end counts as one character.
Next-word accuracy: at ``nextword_words`` word starts spread evenly over each language's text, the gold word
(the segmenter's next word) is compared with the model's 5 most likely next words from
``sokhan.export.nextword.next_words`` (a beam search over subword continuations, the search the runtime uses).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from sokhan import SokhanError

SECTIONS = ("evaluate",)
UPSTREAM = ("tokenize", "train")
LANGS = ("fa", "zh", "en")


@dataclass
class EvaluateConfig:
    """What is measured."""

    ngram_order: int = 5
    """Order of the Kneser-Ney baseline (1 = discounted unigram)."""
    ngram_max_tokens: int = 20_000_000
    """Training tokens the baseline counts (about: whole lines): counting takes about 90 bytes of memory per token.
    A larger training shard is sampled in whole lines, from 256 stretches spread evenly over it (every language in
    its share); the log and the report say so."""
    window: int | None = None
    """Tokens the model sees per scoring window; None = the training sequence length."""
    stride: int | None = None
    """Window step: after the first window each scored token has ≥ window - stride tokens of context; None = half
    the window (a stride equal to the window would leave a window's first tokens almost without context)."""
    max_tokens: int = 20000
    """Predicted tokens per language at most, in whole lines from the start of the held-out text (a first line
    longer than that is scored whole: a line is never cut)."""
    batch_size: int = 8
    """Scoring windows per forward pass."""
    nextword_words: int = 400
    """Word starts per language for next-word accuracy, spread evenly over the text (0 = skip it; each costs a
    small beam search, one batched model step per subword of the words searched)."""
    nextword_beam: int = 8
    """Beam width of the next-word search (hypotheses kept per round, and tokens tried per hypothesis)."""
    onnx_tokens: int = 256
    """With --bundle: tokens per language stepped through ONNX Runtime and compared with PyTorch."""
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    """CPU by default, where the figures in the README come from (a GPU's kernels round differently);
    ``auto``: CUDA when there is a GPU."""

    def __post_init__(self) -> None:
        for key in ("ngram_order", "ngram_max_tokens", "stride", "max_tokens", "batch_size", "nextword_beam", "onnx_tokens"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise SokhanError(f"config: evaluate.{key} = {getattr(self, key)} must be ≥ 1")
        if self.nextword_words < 0:
            raise SokhanError(f"config: evaluate.nextword_words = {self.nextword_words} must be ≥ 0")
        if self.window is not None and self.window < 2:
            raise SokhanError(f"config: evaluate.window = {self.window} must be ≥ 2 (a token and the one it predicts)")
        if self.window is not None and self.stride is not None and not 0 < self.stride <= self.window:
            raise SokhanError(f"config: evaluate.stride = {self.stride} must be in [1, evaluate.window = {self.window}]")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", action="append", type=Path, default=[], metavar="FILE",
                        help="evaluate on this UTF-8 file instead of the held-out split (repeatable); prints, writes nothing")
    parser.add_argument("--lang", action="append", choices=LANGS, default=[],
                        help="language of the --text files, one per --text in the same order (default: detected per line)")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="also run this exported bundle through ONNX Runtime and report its agreement with PyTorch")
    parser.add_argument("--graph", default="decoder.onnx",
                        help="with --bundle: which graph of it to run (decoder.onnx, or a variant such as decoder.int8.onnx)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")


def direct(args: argparse.Namespace, config) -> bool:
    """Ad-hoc evaluation (--text or --bundle): read the run directory, print, write nothing. False: run the stage."""
    texts, langs = getattr(args, "text", []), getattr(args, "lang", [])
    bundle, graph = getattr(args, "bundle", None), getattr(args, "graph", "decoder.onnx")
    if graph != "decoder.onnx" and bundle is None:
        raise SokhanError("--graph needs --bundle DIR (it names a graph of that bundle)")
    if not texts and bundle is None:
        if langs:
            raise SokhanError("--lang needs --text FILE (it names the language of that file)")
        return False
    if langs and len(langs) != len(texts):
        raise SokhanError(f"--lang given {len(langs)} times for {len(texts)} --text files; give one per file or none")
    from sokhan.pipeline.stage import require_trained

    run_dir = Path(args.run_dir)
    require_trained(run_dir, "sokhan evaluate")
    report = evaluate(config.evaluate, run_dir / "tokenize", run_dir / "train",
                      texts=_read_texts(texts, langs) if texts else None, bundle=bundle, graph=graph)
    _print_report(report, args)
    return True


def _print_report(report: dict, args: argparse.Namespace) -> None:
    print(json.dumps(report, indent=2, ensure_ascii=False) if getattr(args, "json", False) else table(report, "text"))


def run(ctx) -> dict:
    from sokhan.pipeline.stage import atomic_write, write_json

    report = evaluate(ctx.config.evaluate, ctx.upstream("tokenize"), ctx.upstream("train"))
    write_json(ctx.out / "report.json", report)
    atomic_write(ctx.out / "report.md", markdown(report))
    return {
        lang: {
            "bits_per_character": r["model"]["bits_per_character"],
            "ngram_bits_per_character": r["ngram"]["bits_per_character"],
            "top1": r["model"]["top1"],
            "nextword_top1": r["model"]["nextword_top1"],
        }
        for lang, r in report["languages"].items()
    }


def show(out: Path, args: argparse.Namespace) -> None:
    """The published report, on stdout: a table, or JSON with ``--json`` (after the stage ran, or skipped)."""
    from sokhan.pipeline.stage import read_json

    _print_report(read_json(out / "report.json"), args)


def _read_texts(files: list[Path], langs: list[str]) -> dict[str, list[str]]:
    """Lines per language from ``files`` (``langs`` parallel to them, or empty: detect per line); not normalized."""
    from collections import Counter

    from sokhan.tokenization import detect_language
    from sokhan.tokenization.langid import SCRIPT_NAMES, other_majority

    out: dict[str, list[str]] = {}
    unknown = 0  # lines in no language this pipeline knows (another script, or no letters at all)
    for i, path in enumerate(files):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise SokhanError(f"--text {path}: no such file") from None
        except IsADirectoryError:
            raise SokhanError(f"--text {path}: is a directory; give a UTF-8 text file") from None
        except OSError as e:
            raise SokhanError(f"--text {path}: cannot read ({e.strerror or e})") from None
        try:
            raw = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise SokhanError(f"--text {path}: line {line}: not UTF-8 (byte 0x{data[e.start]:02x})") from None
        # Lines end at "\n" only, as in corpus files (sokhan.tokenization.corpus): str.splitlines() also breaks at
        # U+2028, \x0c, \x1c… which the normalizer turns into spaces, so the same text scored differently.
        scripts: Counter = Counter()  # with --lang: what detection would have said of the file's lines
        for line in raw.split("\n"):
            if not line.strip():
                continue
            detected = detect_language(line)
            lang = langs[i] if langs else detected
            scripts[detected] += 1
            if lang in LANGS:  # a line without letters of any script has no language to score it as
                out.setdefault(lang, []).append(line)
            else:
                unknown += 1
        if langs and (other := other_majority(scripts, langs[i])):
            from sokhan.pipeline.stage import log

            log(f"evaluate: --lang {langs[i]} for {path}, but most of its lines are in {SCRIPT_NAMES[other[0]]} "
                f"script; they are scored as {langs[i]} all the same")
    names = ", ".join(map(str, files))
    if not out:
        if unknown:
            raise SokhanError(f"--text {names}: none of its {unknown} lines has Persian, Chinese or Latin words "
                              "(--lang fa|zh|en scores a file as that language)")
        raise SokhanError(f"--text {names}: no non-empty lines to evaluate")
    if unknown:
        from sokhan.pipeline.stage import log

        log(f"evaluate: left out {unknown} line(s) of {names} with no Persian, Chinese or Latin words (URLs, digits "
            "and other scripts alone)")
    return out


def _held_out(tok_dir: Path) -> dict[str, list[str]]:
    out = {}
    for lang in LANGS:
        p = tok_dir / "val" / f"{lang}.txt"
        if p.exists():
            lines = [s for s in p.read_text(encoding="utf-8").splitlines() if s.strip()]
            if lines:
                out[lang] = lines
    if not out:
        raise SokhanError(f"{tok_dir / 'val'}: no held-out text (expected {{fa,zh,en}}.txt from the tokenize stage)")
    return out


def _train_tokens(tok_dir: Path, meta: dict[str, Any]):
    """The training shard as a read-only memmap (its ids are read where they are used)."""
    import numpy as np

    path = tok_dir / "train.bin"
    dtype = np.dtype(meta["dtype"])
    if not path.is_file():
        raise SokhanError(f"{path}: no such file (rerun `sokhan tokenize`)")
    size = path.stat().st_size
    if size == 0 or size % dtype.itemsize:
        what = "empty" if size == 0 else f"{size} bytes, not a whole number of {dtype.name} tokens (damaged)"
        raise SokhanError(f"{path}: {what}; rerun `sokhan tokenize --force`")
    return np.memmap(path, dtype=dtype, mode="r")


def _line_end(tokens, i: int, eos_id: int, stop: int) -> int | None:
    """One past the first ``<|eos|>`` in ``tokens[i:stop]`` (the end of the line that holds position ``i``), or None."""
    import numpy as np

    stop, step = min(stop, len(tokens)), 4096
    while i < stop:
        hits = np.flatnonzero(np.asarray(tokens[i : min(i + step, stop)]) == eos_id)
        if hits.size:
            return i + int(hits[0]) + 1
        i, step = i + step, step * 2
    return None


def ngram_sample(tokens, limit: int, eos_id: int, stretches: int = 256, min_stretch: int = 1024):
    """``tokens`` as int64 when there are at most ``limit``; else about ``limit`` tokens (never twice as many) of
    whole lines from ``stretches`` stretches spread evenly over them (fewer where ``limit`` would make them shorter
    than ``min_stretch``). The shard holds its languages one after the other, so its first ``limit`` tokens could all
    be Persian; evenly spread stretches keep every language's share. A stretch takes the lines that start inside it,
    whole, the last one past its end where it runs on (so a language of long lines keeps its share too); a line
    that runs on for more than another stretch length is cut at the stretch's ends. Otherwise the sample is whole
    lines end to end, as the shard is (no n-gram spans a cut the shard does not have)."""
    import numpy as np

    n = len(tokens)
    if n <= limit:
        return np.asarray(tokens, dtype=np.int64)
    stretches = max(1, min(stretches, limit // min_stretch))
    size = limit // stretches
    parts, done = [], 0  # done: where the previous stretch's lines ended
    for start in np.linspace(0, n - size, stretches).astype(np.int64):
        start = int(start)
        # From the first line that starts in the stretch (or its start, inside a line longer than the stretch) to
        # the end of the line it ends in (or its end, where that line runs on for more than another stretch).
        first = 0 if start == 0 else _line_end(tokens, start - 1, eos_id, start + size - 1) or start
        first = max(first, done)
        end = _line_end(tokens, start + size - 1, eos_id, start + 2 * size) or start + size
        if first < end:
            parts.append(np.asarray(tokens[first:end], dtype=np.int64))
            done = end
    return np.concatenate(parts)


def evaluate(cfg: EvaluateConfig, tok_dir: Path, train_dir: Path, texts: dict[str, list[str]] | None = None,
             bundle: Path | None = None, graph: str = "decoder.onnx") -> dict[str, Any]:
    """The report: per language the model's and the n-gram's scores (and the agreement of ``bundle``'s ``graph``).

    texts: raw lines per language, normalized here with the run's settings; None: the held-out split.
    """
    import numpy as np
    import torch

    from sokhan.pipeline import scoring
    from sokhan.pipeline.ngram import KneserNey
    from sokhan.pipeline.stage import log, progress, read_json
    from sokhan.pipeline.stages.tokenize import read_meta
    from sokhan.pipeline.train.checkpoint import load_model
    from sokhan.tokenization import Tokenizer

    meta = read_meta(tok_dir)
    tokenizer = Tokenizer.load(tok_dir / "tokenizer.json")
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, mcfg = load_model(train_dir, device=device)
    model.eval()
    if mcfg.vocab_size != tokenizer.vocab_size:  # tokenize ran again after train: ids would index other rows
        raise SokhanError(f"{train_dir}: the model's vocabulary ({mcfg.vocab_size}) differs from the tokenizer's "
                          f"({tokenizer.vocab_size}) in {tok_dir}; the model is stale, run `sokhan run` first")
    run_cfg = read_json(train_dir / "config.json")
    window = cfg.window or int(run_cfg.get("train", {}).get("seq_len", 256))
    if mcfg.arch == "transformer":
        window = min(window, mcfg.max_seq_len)
    window = max(window, 2)  # train.seq_len = 1 trains on one token of context: a window of 2 gives it that
    stride = min(cfg.stride, window) if cfg.stride is not None else max(window // 2, 1)

    if texts is None:
        split = run_cfg.get("tokenize", {})
        block = int(split.get("val_block", 1))  # runs from before the option held out single lines
        runs = "single lines" if block == 1 else f"in runs of {block} consecutive lines"
        source = (f"held-out split (RUN/tokenize/val): a seeded random {split.get('val_fraction', 0.05):.0%} of each "
                  f"language's lines, {runs}")
        texts = _held_out(tok_dir)
    else:
        source = "given texts"
        trained = [lang for lang, n in meta.get("tokens", {}).get("train", {}).items() if n]
        unseen = sorted(set(texts) - set(trained)) if trained else []
        if unseen:  # scored all the same (a user may want the figure), but a table alone reads as a verdict
            log(f"evaluate: this model was trained on {', '.join(trained)} text only; its {', '.join(unseen)} "
                "figures measure text it has not seen")
        texts = {lang: [n for s in lines if (n := tokenizer.normalize(s, lang)).strip()] for lang, lines in texts.items()}
        emptied = sorted(lang for lang, lines in texts.items() if not lines)  # only zero-width or control characters
        if len(emptied) == len(texts):
            raise SokhanError("--text: no line has any text left after normalization (only whitespace, zero-width or "
                              "control characters)")
        if emptied:
            log(f"evaluate: no {', '.join(emptied)} line has any text left after normalization; left out")
            texts = {lang: lines for lang, lines in texts.items() if lines}

    shard = _train_tokens(tok_dir, meta)
    counted = ngram_sample(shard, cfg.ngram_max_tokens, int(meta["special_tokens"]["<|eos|>"]))
    if len(counted) < len(shard):
        log(f"evaluate: counting the {cfg.ngram_order}-gram baseline on {len(counted):,} of the {len(shard):,} tokens of "
            f"{tok_dir / 'train.bin'}, whole lines from stretches spread evenly over it (evaluate.ngram_max_tokens)")
    else:
        log(f"evaluate: counting the {cfg.ngram_order}-gram baseline on {tok_dir / 'train.bin'}")
    ngram = KneserNey(cfg.ngram_order, int(meta["vocab_size"])).fit(counted)
    ngram_counted, ngram_of = len(counted), len(shard)
    del counted, shard

    def forward(ids):
        return model(ids.to(device))

    fns = scoring.torch_fns(model)
    decoder = None
    if bundle is not None:
        from sokhan.export.runtime import Decoder
        from sokhan.pipeline.config import to_dict

        run_dir = Path(train_dir).parent
        own = Path(bundle).resolve() == (run_dir / "export" / "bundle").resolve()
        if own and (run_dir / "export" / "manifest.json").exists():
            from sokhan.pipeline.stage import check_current

            # The run's own bundle, exported before train ran again: the graph holds the older weights, and its
            # "agreement" with this model (65 % in a user's run) would read as a broken export.
            check_current("export", run_dir)
        decoder = Decoder(bundle, provider="cpu", graph=graph)
        exported, trained = decoder.config.get("model", {}), to_dict(mcfg)
        differ = [k for k in sorted(trained) if k in exported and exported[k] != trained[k]]
        if differ:  # the same tokenizer, another model (the other architecture, or a retrained size)
            k = differ[0]
            raise SokhanError(f"{bundle}: its model is not this run's ({k} = {exported[k]!r} in the bundle, {trained[k]!r} "
                              f"in {train_dir}); export this run again, or pass its own bundle")
        if (bundle / "tokenizer.json").read_bytes() != (tok_dir / "tokenizer.json").read_bytes():
            raise SokhanError(f"{bundle}: its tokenizer.json is not this run's ({tok_dir / 'tokenizer.json'}); the bundle "
                              "comes from another run or an older tokenizer: export this run again")
        if decoder.config["vocab_size"] != mcfg.vocab_size:
            raise SokhanError(f"{bundle}: vocab_size {decoder.config['vocab_size']} differs from the trained model's "
                              f"{mcfg.vocab_size}; export this run again")
    languages: dict[str, Any] = {}
    for lang in progress(list(texts), desc="evaluate"):
        if f"<|lang:{lang}|>" not in tokenizer.special_tokens:
            raise SokhanError(f"language {lang!r}: this run's tokenizer has no <|lang:{lang}|> token (it was trained without {lang} text)")
        text = scoring.encode_lines(tokenizer, texts[lang], lang, cfg.max_tokens)
        nll, rank = scoring.score_windows(forward, text.tokens, window, stride, cfg.batch_size)
        at = text.targets - 1  # score arrays are indexed by position - 1
        neural = scoring.summarize(text, nll[at], rank[at])
        n_logp, n_rank = ngram.score(text.tokens, text.targets)
        base = scoring.summarize(text, -n_logp, n_rank)
        if cfg.nextword_words:
            gold = scoring.word_starts(tokenizer, text, cfg.nextword_words)
            for scores, model_fns in ((neural, fns), (base, scoring.ngram_fns(ngram))):
                ranks = scoring.nextword_ranks(model_fns, tokenizer, text, gold, window, beam=cfg.nextword_beam)
                scores.nextword_top1 = float(np.mean(ranks < 1)) if len(ranks) else None
                scores.nextword_top5 = float(np.mean(ranks < 5)) if len(ranks) else None
                scores.nextword_words = len(ranks)
        entry = {
            "model": asdict(neural),
            "ngram": asdict(base),
            "bpc_reduction": 1.0 - neural.bits_per_character / base.bits_per_character,
        }
        if decoder is not None:
            entry["onnx"] = onnx_agreement(decoder, model, text.tokens[: cfg.onnx_tokens], device, text.targets)
        languages[lang] = entry

    return {
        "model": {"arch": mcfg.arch, "preset": mcfg.preset, "selective": mcfg.selective if mcfg.arch == "mamba" else None,
                  "parameters": sum(p.numel() for p in model.parameters()), "train_dir": str(Path(train_dir).resolve())},
        "ngram": ngram.stats() | ({"counted_tokens": int(ngram_counted), "train_tokens": int(ngram_of)}
                                  if ngram_counted < ngram_of else {}),
        "settings": {
            "source": source,
            "window": window,
            "stride": stride,
            "max_tokens": cfg.max_tokens,
            "predicted": "every token except the <|lang:xx|> line tags; <|eos|> (end of line) included",
            "characters": "normalized characters + 1 per line (its end, which <|eos|> predicts)",
            "bits_per_character": "sum of NLL over predicted tokens in bits / characters",
            "nextword": f"beam search over subword continuations (sokhan.export.nextword.next_words, beam {cfg.nextword_beam}, "
                        f"≤ 8 tokens), top-5 words compared with the segmenter's next word at "
                        f"{cfg.nextword_words} word starts per language, spread evenly over the text",
        },
        "languages": languages,
    }


def onnx_agreement(dec, model, tokens, device: str, targets=None) -> dict[str, Any]:
    """Step ``tokens`` through ``dec`` (a ``runtime.Decoder``) and compare each step's logits with PyTorch's forward.

    The NLL per token is over ``targets`` (positions whose token is predicted; default every one after the first),
    so that with the table's targets, which leave out the ``<|lang|>`` tags, it is measured as the table's is.
    """
    import numpy as np
    import torch

    if dec.max_context is not None:
        tokens = tokens[: dec.max_context]
    targets = np.arange(1, len(tokens)) if targets is None else np.asarray(targets)
    targets = targets[(targets >= 1) & (targets < len(tokens))]
    state = dec.init_state(1)
    onnx_logits = []
    for t in tokens:
        logits, state = dec.step(np.array([t]), state)
        onnx_logits.append(logits[0])
    onnx_logits = np.stack(onnx_logits).astype(np.float64)  # (T, V)
    with torch.no_grad():
        ref = model(torch.as_tensor(np.asarray(tokens)[None], device=device))[0].double().cpu().numpy()  # (T, V)

    def nll(logits: np.ndarray) -> float:  # mean NLL of each target (what a variant costs in quality)
        z = logits[targets - 1] - logits[targets - 1].max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return float(-logp[np.arange(len(targets)), np.asarray(tokens)[targets]].mean())

    out = {
        "bundle": str(dec.bundle),
        "graph": dec.graph_file,
        "tokens": int(len(tokens)),
        "top1_agreement": float(np.mean(onnx_logits.argmax(-1) == ref.argmax(-1))),
        "max_logit_diff": float(np.abs(onnx_logits - ref).max()),
    }
    if len(targets):  # a next token to score
        out["nll_per_token"] = {"onnx": nll(onnx_logits), "torch": nll(ref)}
    return out


_COLUMNS = ("tokens", "characters", "words", "nll_per_token", "perplexity", "bits_per_character", "top1", "top5",
            "nextword_top1", "nextword_top5")
_HEADERS = ("lang", "model", "tokens", "chars", "words", "NLL/tok", "ppl", "bpc", "top-1", "top-5", "word@1", "word@5")


def _rows(report: dict[str, Any]) -> list[list[str]]:
    m = report["model"]
    name = m["arch"] + ("" if m["selective"] in (None, True) else " (LTI)") + f" {m['preset']}"
    rows = []
    for lang, r in report["languages"].items():
        for label, s in ((name, r["model"]), (f"{report['ngram']['order']}-gram KN", r["ngram"])):
            cells = [lang, label]
            for key in _COLUMNS:
                v = s.get(key)
                if v is None:
                    cells.append("–")
                elif isinstance(v, int):
                    cells.append(f"{v:,}")
                elif key in ("top1", "top5", "nextword_top1", "nextword_top5"):
                    cells.append(f"{100 * v:.1f}%")
                else:
                    cells.append(f"{v:.3f}" if math.isfinite(v) else "inf")
            rows.append(cells)
    return rows


def table(report: dict[str, Any], style: Literal["text", "markdown"] = "text") -> str:
    """The report's figures, one row per (language, model): aligned text, or a markdown table."""
    rows = _rows(report)
    if style == "markdown":
        head = "| " + " | ".join(_HEADERS) + " |\n|" + "|".join(["---"] * 2 + ["---:"] * (len(_HEADERS) - 2)) + "|\n"
        return head + "".join("| " + " | ".join(r) + " |\n" for r in rows)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(_HEADERS)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    out = [line(_HEADERS), line(["-" * w for w in widths])] + [line(r) for r in rows]
    for lang, r in report["languages"].items():
        out.append(_versus(lang, r))
        if "onnx" in r:
            o = r["onnx"]
            nll = o.get("nll_per_token")
            out.append(f"{lang}: ONNX ({o['graph']}) vs PyTorch over {o['tokens']} tokens: top-1 agreement "
                       f"{100 * o['top1_agreement']:.1f}%, max |logit diff| {o['max_logit_diff']:.2e}"
                       + (f", NLL/token {nll['onnx']:.3f} vs {nll['torch']:.3f}" if nll else ""))
    return "\n".join(out) + "\n"


def _versus(lang: str, r: dict[str, Any]) -> str:
    d = r["bpc_reduction"]
    return f"{lang}: the model's bits per character are {100 * abs(d):.1f}% {'below' if d >= 0 else 'above'} the n-gram's"


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    notes = "\n".join(f"- {k.replace('_', ' ')}: {v}" for k, v in s.items())
    return (
        f"# Evaluation\n\n{table(report, 'markdown')}\n"
        + "".join(f"- {_versus(lang, r)}\n" for lang, r in report["languages"].items())
        + f"\nHow it was measured:\n\n{notes}\n- n-gram: {json.dumps(report['ngram'])}\n"
    )
