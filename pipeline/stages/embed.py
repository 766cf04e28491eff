"""embed stage: the initial token-embedding table, its nearest neighbours and a PCA plot.

``normal`` draws N(0, std²). ``ppmi-svd`` counts how often two tokens occur within ``window`` positions of each
other in the training shard (inside one line), each pair weighted 1/distance (word2vec's and GloVe's
down-weighting of far contexts), turns the counts into positive pointwise mutual information with
the context distribution smoothed by ^0.75 (Levy, Goldberg & Dagan, 2015), and keeps the top ``d_model``
singular directions, U·√S, rescaled to the normal init's std: tokens used alike start close together.

Writes ``RUN/embed/embeddings.safetensors`` (``"embeddings"``, (V, d_model) float32), ``neighbours.json`` and
``embeddings.png``. ``sokhan embed --inspect`` draws the same for the trained model's table into ``RUN/train/``.
Torch-free: numpy, scipy and scikit-learn do the work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sokhan import SokhanError

SECTIONS = ("embed", "model")
UPSTREAM = ("tokenize",)
# What no later stage reads (train reads embeddings.safetensors): a new plot (embed.plot_tokens) leaves them current.
REPORTS = ("neighbours.json", "embeddings.png")
REPORT_KEYS = ("embed.plot_tokens", "embed.neighbours")  # settings that change only those (`sokhan status`)


@dataclass
class EmbedConfig:
    """How the embedding table is initialised."""

    init: Literal["normal", "ppmi-svd"] = "normal"
    """N(0, std²), or PPMI of windowed co-occurrence counts (weighted 1/distance) from the training shards,
    truncated SVD, rescaled."""
    std: float = 0.02
    """Standard deviation of the table (ppmi-svd's table is rescaled to it)."""
    window: int = 4
    """ppmi-svd: co-occurrence window (tokens on each side)."""
    seed: int = 0
    """Seeds ``normal``'s draws and the SVD's random start."""
    plot_tokens: int = 25
    """Most frequent tokens per language drawn in embeddings.png."""
    neighbours: int = 6
    """Frequent tokens per language whose nearest neighbours go in neighbours.json (8 neighbours each)."""

    def __post_init__(self) -> None:
        if self.std <= 0:
            raise SokhanError(f"config: embed.std = {self.std} must be > 0")
        if self.window < 1:
            raise SokhanError(f"config: embed.window = {self.window} must be ≥ 1")
        if self.plot_tokens < 1 or self.neighbours < 0:
            raise SokhanError("config: embed.plot_tokens must be ≥ 1 and embed.neighbours ≥ 0")


def add_arguments(parser) -> None:
    parser.add_argument("--inspect", action="store_true",
                        help="do not run the stage: draw the TRAINED model's table (RUN/train) into "
                             "RUN/train/embeddings_trained.png and neighbours_trained.json")


def run(ctx) -> dict:
    from safetensors.numpy import save

    from sokhan.pipeline.embedding import token_languages
    from sokhan.pipeline.stage import atomic_write
    from sokhan.pipeline.stages.tokenize import read_meta

    tokenize_dir = ctx.upstream("tokenize")
    meta = read_meta(tokenize_dir)
    vocab = int(meta["vocab_size"])
    d_model = ctx.config.model.resolve(vocab).d_model
    cfg: EmbedConfig = ctx.config.embed
    train = _shard(tokenize_dir, meta, "train")
    if cfg.init == "normal":
        table = normal_table(vocab, d_model, cfg.std, cfg.seed)
        extra = {}
    else:
        table, extra = ppmi_svd_table(train, meta, vocab, d_model, cfg)
    atomic_write(ctx.out / "embeddings.safetensors", save({"embeddings": table}, metadata={"init": cfg.init}))
    langs = token_languages(train, meta)
    report = _report(table, langs, tokenize_dir, cfg, ctx.out / "neighbours.json", ctx.out / "embeddings.png",
                     f"{cfg.init} initial embeddings ({vocab} × {d_model})")
    return {"init": cfg.init, "vocab_size": vocab, "d_model": d_model, "std": float(table.std()), **extra, **report}


def direct(args, config) -> bool:
    """``--inspect`` is answered here, outside the stage runner: it must not rerun or republish RUN/embed."""
    if not getattr(args, "inspect", False):
        return False
    inspect(config, args.run_dir)
    return True


def inspect(config, run_dir: Path) -> None:
    """``sokhan embed --inspect``: the trained model's input embeddings, drawn and queried like the initial ones."""
    from sokhan.pipeline.embedding import token_languages
    from sokhan.pipeline.stage import log, require_trained
    from sokhan.pipeline.stages.tokenize import read_meta
    from sokhan.pipeline.train.checkpoint import load_model

    run_dir = Path(run_dir)
    train_dir, tokenize_dir = run_dir / "train", run_dir / "tokenize"
    require_trained(run_dir, "sokhan embed --inspect")
    model, mcfg = load_model(train_dir)
    table = model.get_input_embeddings().weight.detach().float().numpy()
    meta = read_meta(tokenize_dir)
    langs = token_languages(_shard(tokenize_dir, meta, "train"), meta)
    _report(table, langs, tokenize_dir, config.embed, train_dir / "neighbours_trained.json",
                     train_dir / "embeddings_trained.png", f"trained {mcfg.arch} embeddings ({table.shape[0]} × {table.shape[1]})")
    log(f"embed --inspect: wrote {train_dir / 'embeddings_trained.png'} and {train_dir / 'neighbours_trained.json'}")


def _shard(tokenize_dir: Path, meta: dict, split: str):
    import numpy as np

    path = tokenize_dir / f"{split}.bin"
    if not path.exists():
        raise SokhanError(f"{path}: no such file; rerun `sokhan tokenize --force`")
    return np.memmap(path, dtype=meta["dtype"], mode="r")


def normal_table(vocab: int, d_model: int, std: float, seed: int):
    """(V, d_model) float32 draws from N(0, std²)."""
    import numpy as np

    return (np.random.default_rng(seed).standard_normal((vocab, d_model)) * std).astype(np.float32)


def ppmi_svd_table(train, meta: dict, vocab: int, d_model: int, cfg: EmbedConfig):
    """(V, d_model) float32 PPMI-SVD vectors; tokens never seen in the shard get normal draws. Also returns facts."""
    import numpy as np
    from sklearn.utils.extmath import randomized_svd

    from sokhan.pipeline.embedding import cooccurrence

    counts = cooccurrence(train, meta, vocab, cfg.window)  # (V, V) csr, symmetric
    total = counts.sum()
    if total == 0:
        raise SokhanError("embed: the training shard has no co-occurring tokens; add text or lower embed.window")
    row = np.asarray(counts.sum(axis=1)).ravel()  # (V,)
    context = row**0.75
    context /= context.sum()
    coo = counts.tocoo()
    pmi = np.log(coo.data / total) - np.log(row[coo.row] / total) - np.log(context[coo.col])
    keep = pmi > 0
    import scipy.sparse as sp

    ppmi = sp.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=(vocab, vocab))
    k = min(d_model, vocab - 1)
    u, s, _ = randomized_svd(ppmi, n_components=k, n_iter=5, random_state=cfg.seed)
    seen = row > 0
    # The matrix has at most as many directions as tokens seen: past its rank a column is 0 for every token
    # (a small corpus, or d_model near the vocabulary), so only the columns up to the rank come from the SVD.
    rank = int(min(k, seen.sum(), (s > s[0] * 1e-10).sum() if s.size and s[0] > 0 else 0))
    vectors = np.zeros((vocab, d_model))
    vectors[:, :rank] = (u * np.sqrt(s))[:, :rank]
    if rank:
        vectors[seen, :rank] *= cfg.std / vectors[seen, :rank].std()
    rng = np.random.default_rng(cfg.seed)
    # Unseen tokens and the columns past the rank get the normal init, so no row or column is dead.
    vectors[~seen] = rng.standard_normal((int((~seen).sum()), d_model)) * cfg.std
    if rank < d_model:
        vectors[:, rank:] = rng.standard_normal((vocab, d_model - rank)) * cfg.std
    return vectors.astype(np.float32), {
        "cooccurrence_pairs": int(counts.nnz), "ppmi_nonzero": int(ppmi.nnz), "tokens_seen": int(seen.sum()), "svd_rank": rank,
        "singular_values_top5": [round(float(x), 4) for x in s[:5]],
    }


def _report(table, langs, tokenize_dir: Path, cfg: EmbedConfig, neighbours_path: Path, png: Path, title: str) -> dict:
    import numpy as np

    from sokhan.pipeline.embedding import frequent_tokens, nearest_neighbours, plot_pca, readable
    from sokhan.pipeline.stage import write_json
    from sokhan.tokenization import Tokenizer

    tok = Tokenizer.load(tokenize_dir / "tokenizer.json")

    def text(i: int) -> str:
        return tok.decode([int(i)])

    special = set(tok.special_tokens.values())
    frequent = frequent_tokens(langs, text, special, max(cfg.plot_tokens, cfg.neighbours))
    queries = {lang: ids[: cfg.neighbours] for lang, ids in frequent.items()}
    # Neighbours among tokens that occur in the shard and decode to whole text: unseen rows are random draws.
    seen = sum(langs.values()) > 0
    candidates = np.array([bool(s) and i not in special and readable(text(i)) for i, s in enumerate(seen)])
    neighbours = nearest_neighbours(table, queries, text, candidates, k=8)
    write_json(neighbours_path, neighbours)
    plot_pca(table, {lang: ids[: cfg.plot_tokens] for lang, ids in frequent.items()}, text, png, title)
    return {"languages": sorted(frequent), "plotted_tokens": sum(min(len(v), cfg.plot_tokens) for v in frequent.values())}
