"""Run configuration: TOML read into one dataclass per section, checked field by field.

A run's config is ``RunConfig``: one section per stage (``corpus``, ``normalize``, ``tokenize``, ``embed``,
``model``, ``train``, ``export``, ``evaluate``). Each section's dataclass lives beside the code that reads it
(``stages/<name>.py``, ``models/config.py``) and checks contradictory settings in ``__post_init__`` by raising
``SokhanError``. This module only turns TOML into those dataclasses: unknown keys and wrong types are rejected
with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from sokhan import SokhanError
from sokhan.pipeline.models.config import ModelConfig
from sokhan.pipeline.stages.embed import EmbedConfig
from sokhan.pipeline.stages.evaluate import EvaluateConfig
from sokhan.pipeline.stages.export import ExportConfig
from sokhan.pipeline.stages.normalize import CorpusConfig, NormalizeConfig
from sokhan.pipeline.stages.tokenize import TokenizeConfig
from sokhan.pipeline.stages.train import TrainConfig

CONFIG_DIR = Path(__file__).parent / "configs"

# Keys added to a section after runs were made without them, each with the value that does what those runs did (its
# default). A stage's fingerprint leaves such a key out while it holds that value, so that upgrading sokhan neither
# makes every finished stage stale nor deletes an interrupted training run's checkpoints (a resumable stage keeps its
# work only while its fingerprint is unchanged). An entry stays for good, and its key's default must not change.
ADDED_LATER: dict[tuple[str, str], Any] = {
    ("normalize", "workers"): 0,
    ("tokenize", "val_block"): 1,
    ("train", "embedding_weight_decay"): 0.0,
    ("evaluate", "ngram_max_tokens"): 20_000_000,  # the runs before it had fewer training tokens: all counted
}

# Keys that decide how a stage does its work, not what it writes (tests check the same bytes come out for other
# values): a fingerprint sees them at the value given here whatever they are set to, so changing one reruns nothing.
# tokenize.workers is the same kind but predates this table: runs made with it set have it in their fingerprint, and
# listing it here would make them stale; changing it reruns the tokenize stage alone (its outputs are the same).
NEUTRAL: dict[tuple[str, str], Any] = {
    ("normalize", "workers"): 0,
}


@dataclass
class RunConfig:
    """Everything a run needs, one section per stage."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def fingerprint_config(config: RunConfig, sections) -> dict[str, Any]:
    """The config sections a stage's fingerprint covers, as plain values, with the ``NEUTRAL`` keys at their fixed
    value, less the ``ADDED_LATER`` keys that hold the value runs had before the key existed."""
    data = to_dict(config)
    unset = object()
    out = {}
    for s in sections:
        values = {k: NEUTRAL.get((s, k), v) for k, v in data[s].items()}
        out[s] = {k: v for k, v in values.items() if ADDED_LATER.get((s, k), unset) != v}
    return out


def to_dict(obj: Any) -> Any:
    """A dataclass as plain JSON/TOML values (paths as strings)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` (from TOML/JSON) as type ``tp``, or a SokhanError naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SokhanError(f"config: {key} must be a table, got {type(value).__name__}")
        return from_dict(tp, value, prefix=key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise SokhanError(f"config: {key} = {value!r} is not one of {_type_name(tp)}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except SokhanError:
                continue
        raise SokhanError(f"config: {key} = {value!r} must be {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, list):
            raise SokhanError(f"config: {key} must be a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SokhanError(f"config: {key} must be a table, got {type(value).__name__}")
        _, item = typing.get_args(tp)
        return {k: _convert(v, item, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Path and isinstance(value, str):
        return Path(value)
    if tp is Any:
        return value
    # bool is an int in Python; a TOML `true` must not pass for a count.
    if isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise SokhanError(f"config: {key} = {value!r} must be {_type_name(tp)}, got {type(value).__name__}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise SokhanError naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            valid = ", ".join(sorted(names))
            raise SokhanError(f"config: unknown key {full!r} (valid keys here: {valid})")
        kwargs[key] = _convert(value, hints[key], full)
    # A field without a default (corpus.paths[i].path) left out would be a TypeError from the constructor.
    required = [f.name for f in dataclasses.fields(cls)
                if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for name in required:
        if name not in kwargs:
            raise SokhanError(f"config: {prefix + ': ' if prefix else ''}missing key {name!r}")
    try:
        return cls(**kwargs)
    except SokhanError as e:
        msg = str(e)
        raise SokhanError(msg if msg.startswith("config:") else f"config: {prefix}: {msg}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], value); the value is read as TOML, else as a string."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise SokhanError(f"--set {item!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def _resolve_corpus_paths(data: dict[str, Any], base: Path) -> None:
    """Corpus paths in a config file are relative to that file, so a preset works from any directory."""
    for src in data.get("corpus", {}).get("paths", []):
        if isinstance(src, dict) and isinstance(src.get("path"), str):
            p = Path(src["path"]).expanduser()
            src["path"] = str(p if p.is_absolute() else (base / p).resolve())


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        presets = ", ".join(x.stem for x in sorted(CONFIG_DIR.glob("*.toml")))
        raise SokhanError(f"config: {path}: no such file (a config is a TOML file or a preset: {presets})") from None
    except IsADirectoryError:
        raise SokhanError(f"config: {path}: is a directory, not a TOML file") from None
    except OSError as e:  # permissions, a FIFO, an I/O error: one line, not a traceback
        raise SokhanError(f"config: {path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:  # tomllib decodes the whole file as UTF-8 before parsing
        raise SokhanError(f"config: {path}: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise SokhanError(f"config: {path}: invalid TOML: {e}") from None
    _resolve_corpus_paths(data, path.resolve().parent)
    return data


def load_config(path: Path | str | None = None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """The run config from ``base`` (a stored config dict) or a TOML file, then ``section.key=value`` overrides.

    ``path`` may name a bundled preset (``sample`` for ``pipeline/configs/sample.toml``): a bare name (no folder,
    no suffix) that is a preset's is the preset wherever the command runs; a file of that name is ``./sample``.
    """
    data: dict[str, Any] = json.loads(json.dumps(base)) if base else {}
    if path is not None:
        p = Path(path)
        # The preset before the current folder: `--config sample` read data/sample/ (a folder) in the checkout's
        # data/, and any file called `sample` elsewhere, silently.
        bare = "/" not in str(path) and os.sep not in str(path) and not p.suffix
        if bare and (CONFIG_DIR / f"{path}.toml").exists():
            p = CONFIG_DIR / f"{path}.toml"
        data = read_toml(p)
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise SokhanError(f"--set {item!r}: {k} is not a section")
        if keys[0] == "corpus" and keys[-1] == "paths":
            _resolve_corpus_paths({"corpus": {"paths": value}}, Path.cwd())
        node[keys[-1]] = value
    config = from_dict(RunConfig, data)
    # The model's sizes come together only in resolve (preset, then the keys given): checked now, so that `status
    # --set` refuses what `run` would, and `run` before any stage reruns (the vocabulary size is the tokenizer's).
    config.model.resolve(vocab_size=config.model.vocab_size or 2)
    return config


def presets() -> list[Path]:
    """The bundled preset files."""
    return sorted(CONFIG_DIR.glob("*.toml"))
