"""Run an exported bundle with ONNX Runtime: generation and next-word prediction, without torch.

A bundle (``RUN/export/bundle/``) holds ``decoder.onnx`` (one decode step: ``input_ids`` (B, 1) and the state in,
``logits`` (B, V) and the new state out), ``tokenizer.json`` + ``segmenter.json``, and ``config.json``, which
names every state tensor and its shape. ``Decoder`` checks the three against each other when it opens them, so a
bad bundle fails with one line naming the file and the problem, not inside a session run.

The state stays an ONNX Runtime ``OrtValue`` between steps, bound with IOBinding: on CUDA it never leaves the
device; only the logits come back to the host (except a float32 or int8 transformer graph's attention, which ONNX
Runtime runs on the CPU: ``cuda_notice``). ``StepGraph.step`` keeps its input state (beam search branches from
it); ``StepLoop`` (Mamba's fixed-size state) and ``CacheLoop`` (the transformer's KV cache), which
``Decoder.generate`` uses, step one state in place. This
module imports numpy, onnxruntime and ``sokhan.tokenization``, never torch (a test runs it in a fresh interpreter
and checks ``sys.modules``).
"""

from __future__ import annotations

import json
import numbers
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sokhan import SokhanError

BUNDLE_FORMAT = "sokhan-bundle"
BUNDLE_VERSION = 1
CONFIG = "config.json"
DECODER = "decoder.onnx"
TOKENIZER = "tokenizer.json"
SEGMENTER = "segmenter.json"
METADATA_KEY = "sokhan.config"  # the graph's metadata entry holding the bundle config (export/onnx.py writes it)
EOS = "<|eos|>"
_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8}  # int8: a quantized KV cache (kvcache.py)
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}
MIN_ONNXRUNTIME = (1, 28)
"""The oldest ONNX Runtime that runs every graph sokhan writes, and computes it right (``benchmarks/ort_compat.py``,
table in benchmarks/README.md): 1.24 to 1.27 cannot load the float16 graphs; the transformer's int8 KV cache does
not load before 1.26, fails to run on 1.26 and gives wrong logits on 1.27. pip enforces it through pyproject.toml,
but not on a machine where sokhan was installed with ``--no-deps`` beside an older onnxruntime: hence a check."""
_NOTICED = False  # the CPU-fallback notice is said once per process
_PRELOADED = False  # CUDA libraries looked for (once per process)


@dataclass(frozen=True)
class StateSpec:
    """One state tensor: its graph input and output names, shape (ints, ``"batch"`` and ``"past"``) and dtype."""

    input: str
    output: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"

    def zeros(self, batch: int) -> np.ndarray:
        """The state before the first token: zeros, and an empty past for a KV cache."""
        dims = [batch if d == "batch" else 0 if d == "past" else d for d in self.shape]
        return np.zeros(dims, dtype=_DTYPES[self.dtype])


@dataclass
class DecodeState:
    """The recurrent state between steps: one ``OrtValue`` per ``StateSpec``, and the next position."""

    tensors: list[Any]  # onnxruntime.OrtValue, in config order
    position: int = 0

    @property
    def batch_size(self) -> int:
        return self.tensors[0].shape()[0]


def read_config(bundle: Path) -> dict[str, Any]:
    path = bundle / CONFIG
    if not bundle.is_dir():
        raise SokhanError(f"{bundle}: no such bundle directory (export one with `sokhan export --run-dir RUN`)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SokhanError(f"{path}: missing; a bundle holds {CONFIG}, {DECODER}, {TOKENIZER} and {SEGMENTER}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SokhanError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != BUNDLE_FORMAT:
        raise SokhanError(f"{path}: not a sokhan bundle config (expected \"format\": \"{BUNDLE_FORMAT}\")")
    if cfg.get("format_version") != BUNDLE_VERSION:
        raise SokhanError(f"{path}: bundle format_version {cfg.get('format_version')!r}; this sokhan reads {BUNDLE_VERSION}")
    for key in ("arch", "vocab_size", "special_tokens", "state", "uses_position_ids"):
        if key not in cfg:
            raise SokhanError(f"{path}: missing key {key!r}")
    return cfg


def state_specs(cfg: dict[str, Any]) -> list[StateSpec]:
    try:
        specs = [StateSpec(s["input"], s["output"], tuple(s["shape"]), s.get("dtype", "float32")) for s in cfg["state"]]
    except (KeyError, TypeError) as e:
        raise SokhanError(f"{CONFIG}: key 'state' must be a list of {{input, output, shape, dtype}} ({e})") from None
    for spec in specs:
        if spec.dtype not in _DTYPES:  # else a KeyError when the first state is allocated
            raise SokhanError(f"{CONFIG}: state {spec.input} has dtype {spec.dtype!r}; expected one of {', '.join(_DTYPES)}")
    return specs


def _preload_cuda() -> None:
    """Let onnxruntime-gpu find CUDA's libraries without torch: ``preload_dlls`` loads them from the nvidia-* pip
    packages or the loader path (importing a CUDA build of torch first does the same, and this runtime never
    imports torch). Where they are missing it prints a line per library; the notice in ``open_session`` says it
    once instead."""
    import contextlib
    import io

    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):  # onnxruntime >= 1.21
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                ort.preload_dlls()
            except Exception:  # noqa: BLE001 (a library that cannot load leaves the CPU provider)
                pass


def _gpu_present() -> bool:
    """Whether this machine has an NVIDIA GPU (its driver), so that ``auto`` has a CUDA provider to try."""
    import glob
    import os

    return os.path.exists("/proc/driver/nvidia/version") or bool(glob.glob("/dev/nvidia[0-9]*"))


def _providers(provider: str) -> list[str]:
    import onnxruntime as ort

    if provider not in ("auto", "cuda", "cpu"):
        raise SokhanError(f"provider {provider!r}: valid providers are auto, cuda, cpu")
    available = ort.get_available_providers()
    # onnxruntime-gpu lists its CUDA provider on any machine; without a GPU, auto is the CPU, without a notice.
    if provider == "cpu" or "CUDAExecutionProvider" not in available or (provider == "auto" and not _gpu_present()):
        if provider == "cuda":
            raise SokhanError("provider 'cuda': this onnxruntime build has no CUDA provider (install onnxruntime-gpu)")
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def check_version(version: str) -> None:
    """Refuse an onnxruntime older than ``MIN_ONNXRUNTIME`` in one line."""
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if found < MIN_ONNXRUNTIME:
        want = ".".join(map(str, MIN_ONNXRUNTIME))
        raise SokhanError(f"onnxruntime {version} is older than {want}, the oldest that runs sokhan's graphs right; "
                          f"pip install 'onnxruntime>={want}' (or onnxruntime-gpu)")


def open_session(path: Path, provider: str = "auto", threads: int | None = None):
    """An ``InferenceSession`` for ``path``; a missing or unreadable model is one SokhanError line."""
    import onnxruntime as ort

    check_version(ort.__version__)
    if not path.is_file():
        raise SokhanError(f"{path}: missing ONNX graph")
    providers: list = _providers(provider)
    want_cuda = "CUDAExecutionProvider" in providers
    if want_cuda:
        global _PRELOADED
        if not _PRELOADED:
            _preload_cuda()
            _PRELOADED = True
        # TF32, ONNX Runtime's default for float32 matrix products on Ampere and later, keeps 10 bits of mantissa:
        # 3e-3 of logit difference measured against float32 (simulated), 30× the parity tolerance. Decoding one
        # token at a time is bound by memory, not by those products, so full float32 costs nothing there.
        providers = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    # A CUDA provider that cannot load (no GPU, missing libraries) logs through the default logger; the notice below says it in one line.
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SokhanError(f"{path}: ONNX Runtime cannot load this graph ({first})") from None
    finally:
        ort.set_default_logger_severity(2)
    used = session.get_providers()
    if want_cuda and "CUDAExecutionProvider" not in used:
        if provider == "cuda":
            raise SokhanError(f"{path}: provider 'cuda' requested but the CUDA provider did not load (no GPU or CUDA libraries)")
        global _NOTICED
        if not _NOTICED:
            print("sokhan: CUDA provider unavailable, running on CPU", file=sys.stderr)
            _NOTICED = True
    return session


def check_graph(session, cfg: dict[str, Any], specs: list[StateSpec], path: Path, prefill: bool = False) -> None:
    """The graph's inputs and outputs are those ``config.json`` describes, with the same fixed sizes.

    ``prefill``: the prompt graph, which takes no state in.
    """
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    want_in = ["input_ids"] + (["position_ids"] if cfg["uses_position_ids"] else []) + ([] if prefill else [s.input for s in specs])
    want_out = ["logits"] + [s.output for s in specs]
    for kind, have, want in (("input", inputs, want_in), ("output", outputs, want_out)):
        missing = [n for n in want if n not in have]
        extra = [n for n in have if n not in want]
        if missing or extra:
            raise SokhanError(
                f"{path}: graph {kind}s do not match {CONFIG}: "
                + "; ".join(p for p in (missing and f"missing {missing}", extra and f"unexpected {extra}") if p)
            )
    vocab = outputs["logits"].shape[-1]
    if isinstance(vocab, int) and vocab != cfg["vocab_size"]:
        raise SokhanError(f"{path}: graph logits have {vocab} entries but {CONFIG} says vocab_size = {cfg['vocab_size']}")
    for spec in specs:
        shape = (outputs[spec.output] if prefill else inputs[spec.input]).shape
        if len(shape) != len(spec.shape):
            raise SokhanError(f"{path}: input {spec.input} has rank {len(shape)} but {CONFIG} gives shape {list(spec.shape)}")
        for got, want in zip(shape, spec.shape):
            if isinstance(want, int) and isinstance(got, int) and got != want:
                raise SokhanError(f"{path}: input {spec.input} has shape {shape} but {CONFIG} gives {list(spec.shape)}")


def file_digests(bundle: Path) -> dict[str, str]:
    """sha256 of the tokenizer files, which ``config.json`` and every graph's metadata record (``files``)."""
    import hashlib

    return {name: hashlib.sha256((bundle / name).read_bytes()).hexdigest() for name in (TOKENIZER, SEGMENTER)}


def check_files(bundle: Path, cfg: dict[str, Any]) -> None:
    """The tokenizer files are the ones the model was exported with. Two tokenizers of one size (two runs'
    tokenize stages) are interchangeable to every other check, and a swapped one turns the output into noise."""
    recorded = cfg.get("files")
    if recorded is None:  # bundles exported before sokhan recorded them
        return
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise SokhanError(f"{bundle / CONFIG}: key 'files' must map file names to sha256 digests, not {recorded!r:.60}")
    for name, digest in file_digests(bundle).items():
        if recorded.get(name) not in (None, digest):
            raise SokhanError(f"{bundle / name}: not the file this model was exported with ({CONFIG} records sha256 "
                              f"{recorded[name][:12]}…, the file has {digest[:12]}…); copy the bundle whole")


def check_graph_files(session, cfg: dict[str, Any], path: Path) -> None:
    """The graph was exported with this bundle's tokenizer: its metadata (``sokhan.config``) records the same
    ``files`` as ``config.json``. A graph from another run whose tokenizer has the same size passes every shape
    check and produces noise."""
    meta = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    try:
        graph_files = json.loads(meta).get("files") if meta else None
    except (json.JSONDecodeError, AttributeError):
        raise SokhanError(f"{path}: its {METADATA_KEY} metadata is not a JSON object") from None
    # Where config.json records the files, the graph must record the same: one exported before they were recorded
    # (none recorded) comes from another bundle as surely as one that records others.
    if cfg.get("files") and graph_files != cfg["files"]:
        raise SokhanError(f"{path}: exported with another tokenizer than this bundle's ({CONFIG} and the graph's "
                          "metadata record different tokenizer files); copy the bundle whole")


def graph_dtypes(session, specs: list[StateSpec], path: Path) -> list[StateSpec]:
    """``specs`` with each state tensor's dtype as the graph declares it (``config.json`` gives float32's)."""
    from dataclasses import replace

    types = {i.name: i.type for i in session.get_inputs()}
    names = {v: k for k, v in _DTYPES.items()}
    out = []
    for spec in specs:
        dtype = _ORT_DTYPES.get(types[spec.input])
        if dtype is None:
            raise SokhanError(f"{path}: state input {spec.input} is {types[spec.input]}; expected float, float16 or int8")
        out.append(replace(spec, dtype=names[dtype]))
    return out


def sample(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> np.ndarray:
    """Next token per row of ``logits`` (B, V): argmax at temperature 0, else softmax sampling (top-k first)."""
    if temperature <= 0:
        return logits.argmax(-1)
    x = logits.astype(np.float64)
    if top_k is not None and top_k < x.shape[-1]:
        kth = np.partition(x, -top_k, axis=-1)[:, -top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    # The maximum first, then the temperature: at a temperature near 0 (1e-310) the division overflows to -inf,
    # which exp makes 0 (greedy), where dividing first made inf - inf = nan.
    with np.errstate(over="ignore"):
        p = np.exp((x - x.max(-1, keepdims=True)) / temperature)
    p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])


class StepGraph:
    """A step graph driven through IOBinding: the state stays on the provider's device, only logits come back."""

    def __init__(self, session, specs: list[StateSpec], uses_position_ids: bool) -> None:
        self.session = session
        self.specs = specs
        self.uses_position_ids = uses_position_ids
        self.device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    def state_from_numpy(self, arrays: Sequence[np.ndarray], position: int = 0) -> DecodeState:
        import onnxruntime as ort

        return DecodeState([ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device, 0) for a in arrays], position)

    def init_state(self, batch_size: int = 1) -> DecodeState:
        return self.state_from_numpy([s.zeros(batch_size) for s in self.specs])

    def take(self, state: DecodeState, rows: np.ndarray) -> DecodeState:
        """A new state whose row i is row ``rows[i]`` of ``state`` (rows may repeat): a beam search's hypotheses.

        Through host memory: a beam's states are small, and a gather graph per state tensor would cost more.
        """
        return self.state_from_numpy([t.numpy()[rows] for t in state.tensors], state.position)

    def step(self, ids: np.ndarray, state: DecodeState) -> tuple[np.ndarray, DecodeState]:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1, 1)  # (B, 1)
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", ids)
        if self.uses_position_ids:
            io.bind_cpu_input("position_ids", np.full_like(ids, state.position))
        for spec, value in zip(self.specs, state.tensors):
            io.bind_ortvalue_input(spec.input, value)
        io.bind_output("logits", "cpu")
        for spec in self.specs:
            io.bind_output(spec.output, self.device, 0)
        self.session.run_with_iobinding(io)
        out = io.get_outputs()
        return out[0].numpy(), DecodeState(list(out[1:]), state.position + 1)


class StepLoop:
    """Stepping one sequence of states forward in place: two preallocated state buffers, alternately read and
    written, through two IOBindings built once.

    ``StepGraph.step`` leaves its input state untouched (a beam search branches from it), so every call binds
    every tensor again and ONNX Runtime allocates a new state; for a tiny Mamba that is ~70 µs of a ~0.4 ms step.
    Generation never goes back to an old state, so here each call binds only the next ids, and the state just
    read becomes the buffer the following call writes. Only for states of fixed shape (Mamba's); a KV cache
    grows every step. The loop takes ``state`` over: its tensors are the first buffer (no copy, so on CUDA the
    state never leaves the device) and later steps overwrite them. ``state()`` copies the current state out.
    """

    def __init__(self, graph: StepGraph, state: DecodeState) -> None:
        import onnxruntime as ort

        if graph.uses_position_ids or any("past" in spec.shape for spec in graph.specs):
            raise SokhanError("StepLoop: the state grows with the context (a KV cache); use StepGraph.step")
        self.graph, self.position, batch = graph, state.position, state.batch_size
        self.buffers = (
            list(state.tensors),
            [ort.OrtValue.ortvalue_from_shape_and_type(t.shape(), _ORT_DTYPES[t.data_type()], graph.device, 0)
             for t in state.tensors],
        )
        self.ids = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, 1), np.int64))  # host memory, updated in place
        vocab = graph.session.get_outputs()[0].shape[-1]
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type((batch, vocab), np.float32, "cpu", 0)
        self.bindings = [self._bind(self.buffers[i], self.buffers[1 - i]) for i in (0, 1)]
        self.current = 0  # index of the buffer holding the current state

    def _bind(self, src: list, dst: list):
        io = self.graph.session.io_binding()
        io.bind_ortvalue_input("input_ids", self.ids)
        for spec, value in zip(self.graph.specs, src):
            io.bind_ortvalue_input(spec.input, value)
        io.bind_ortvalue_output("logits", self.logits)
        for spec, value in zip(self.graph.specs, dst):
            io.bind_ortvalue_output(spec.output, value)
        return io

    def step(self, ids: np.ndarray) -> np.ndarray:
        """One token per row: ``ids`` (B,) -> logits (B, V) (a copy); the state advances in place."""
        self.ids.update_inplace(np.asarray(ids, dtype=np.int64).reshape(-1, 1))
        self.graph.session.run_with_iobinding(self.bindings[self.current])
        self.current = 1 - self.current
        self.position += 1
        return self.logits.numpy().copy()

    def state(self) -> DecodeState:
        """The current state, copied out (later steps do not change it)."""
        return self.graph.state_from_numpy([t.numpy() for t in self.buffers[self.current]], self.position)


class CacheLoop:
    """Stepping one sequence forward with its KV cache updated in place: the transformer's ``StepLoop``.

    The transformer's step graph attends through ``GroupQueryAttention`` (``sokhan.export.gqa``), which appends
    the new key and value in place when ``past`` and ``present`` are the same buffer. So the loop allocates each
    cache once, ``capacity`` entries long (the positions it may still reach), copies the state's ``position``
    entries in, and binds every buffer as both input and output; a step writes one row per layer instead of
    copying the cache, and its cost no longer grows with the copy. The bundle says its graph can do this
    (``config.json``: ``"kv_share_buffer": true``); graphs from before are stepped through ``StepGraph.step``.
    """

    def __init__(self, graph: StepGraph, state: DecodeState, capacity: int) -> None:
        import onnxruntime as ort

        if not graph.uses_position_ids:
            raise SokhanError("CacheLoop: this graph keeps no KV cache; use StepLoop")
        if capacity < state.position:
            raise SokhanError(f"CacheLoop: capacity {capacity} is less than the state's {state.position} entries")
        self.graph, self.position, self.capacity, batch = graph, state.position, capacity, state.batch_size
        self.buffers = []
        for t in state.tensors:
            host = t.numpy()  # (B, nh, position, hs)
            buf = np.zeros((*host.shape[:2], capacity, host.shape[3]), dtype=host.dtype)
            buf[:, :, : self.position] = host
            self.buffers.append(ort.OrtValue.ortvalue_from_numpy(buf, graph.device, 0))
        self.ids = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, 1), np.int64))  # host memory, updated in place
        self.positions = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, 1), np.int64))
        vocab = graph.session.get_outputs()[0].shape[-1]
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type((batch, vocab), np.float32, "cpu", 0)
        self.io = graph.session.io_binding()
        self.io.bind_ortvalue_input("input_ids", self.ids)
        self.io.bind_ortvalue_input("position_ids", self.positions)
        self.io.bind_ortvalue_output("logits", self.logits)
        for spec, value in zip(graph.specs, self.buffers):
            self.io.bind_ortvalue_input(spec.input, value)
            self.io.bind_ortvalue_output(spec.output, value)

    def step(self, ids: np.ndarray) -> np.ndarray:
        """One token per row: ``ids`` (B,) -> logits (B, V) (a copy); the cache grows by one entry in place."""
        if self.position >= self.capacity:
            raise SokhanError(f"CacheLoop: the cache holds {self.capacity} entries and all are used")
        ids = np.asarray(ids, dtype=np.int64).reshape(-1, 1)
        self.ids.update_inplace(ids)
        self.positions.update_inplace(np.full_like(ids, self.position))
        self.graph.session.run_with_iobinding(self.io)
        self.position += 1
        return self.logits.numpy().copy()

    def state(self) -> DecodeState:
        """The current state, copied out (the ``position`` filled entries of each cache)."""
        return self.graph.state_from_numpy([t.numpy()[:, :, : self.position] for t in self.buffers], self.position)


def cuda_notice(config: dict, specs: list[StateSpec], device: str, graph: str) -> str | None:
    """What a user deploying ``graph`` on a GPU should know, or None: ONNX Runtime's CUDA kernel for
    ``GroupQueryAttention`` (the transformer's attention in the bundle) exists in float16 and bfloat16 only, so a
    float32 or int8-cache graph runs that node on the CPU and copies the KV cache there and back every token."""
    if device != "cuda" or not config.get("kv_share_buffer") or all(s.dtype == "float16" for s in specs):
        return None
    return (f"{graph}: its attention (GroupQueryAttention) has CUDA kernels in float16 only, so on this GPU it runs "
            "on the CPU, the KV cache copied there and back every token; deploy the float16 graph "
            "(`sokhan export --precision fp16`, then --graph decoder.fp16.onnx)")


def _integer(name: str, value: Any, low: int, optional: bool = False) -> None:
    """A SokhanError naming the parameter unless ``value`` is an int >= ``low`` (or None when ``optional``): numpy
    and the loops took 2.5 or "3" with errors of their own, and True as 1."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise SokhanError(f"{name} = {value!r} must be an integer >= {low}" + (" or None" if optional else ""))


class Decoder:
    """An exported bundle, ready to generate text and predict next words.

    ``provider``: ``"auto"`` (CUDA when it loads, else CPU: silently on a machine without an NVIDIA GPU, with a
    one-line notice where one did not load), ``"cuda"`` or ``"cpu"``.
    ``graph``: the ONNX file in the bundle to run (``decoder.onnx``; a bundle may add ``decoder.fp16.onnx`` or
    ``decoder.int8.onnx``, listed in ``config.json``'s ``variants``).
    """

    def __init__(self, bundle_dir: str | Path, provider: str = "auto", graph: str = DECODER, threads: int | None = None):
        from sokhan.tokenization import Tokenizer

        self.bundle = Path(bundle_dir)
        self.config = read_config(self.bundle)
        self.specs = state_specs(self.config)
        for name in (TOKENIZER, SEGMENTER):
            if not (self.bundle / name).is_file():
                raise SokhanError(f"{self.bundle / name}: missing; the bundle must carry the tokenizer it was trained with")
        try:
            self.tokenizer = Tokenizer.load(self.bundle / TOKENIZER)
        except SokhanError:
            raise
        except Exception as e:  # a corrupt tokenizer file: the tokenizers library's own errors
            raise SokhanError(f"{self.bundle / TOKENIZER}: cannot load the tokenizer ({e})") from None
        if self.tokenizer.vocab_size != self.config["vocab_size"]:
            raise SokhanError(
                f"{self.bundle / TOKENIZER}: vocabulary of {self.tokenizer.vocab_size} tokens but {CONFIG} says {self.config['vocab_size']}"
            )
        check_files(self.bundle, self.config)
        path, self.graph_file = self.bundle / graph, graph
        if self.config.get("prefill") and graph == self.config["prefill"]:
            raise SokhanError(f"{path}: the prompt (prefill) graph, which runs with {DECODER}; choose a step graph "
                              f"({DECODER} or a variant of it such as decoder.int8.onnx)")
        self.session = open_session(path, provider, threads)
        check_graph(self.session, self.config, self.specs, path)
        check_graph_files(self.session, self.config, path)
        self.specs = graph_dtypes(self.session, self.specs, path)  # the fp16 variant's state is float16
        self.prefill_session = None
        if self.config.get("prefill") and graph == DECODER:
            prefill_path = self.bundle / self.config["prefill"]
            self.prefill_session = open_session(prefill_path, provider, threads)
            check_graph(self.prefill_session, self.config, self.specs, prefill_path, prefill=True)
            check_graph_files(self.prefill_session, self.config, prefill_path)
        self.providers = self.session.get_providers()
        self.graph = StepGraph(self.session, self.specs, self.config["uses_position_ids"])
        self.device = self.graph.device
        notice = cuda_notice(self.config, self.specs, self.device, graph)
        if notice:
            print(f"sokhan: {notice}", file=sys.stderr)
        self.max_context: int | None = self.config.get("max_context")
        self.eos = self.config["special_tokens"].get(EOS)
        self._warned: set[str | None] = set()  # prompt languages warned about (None: no language detected)

    def init_state(self, batch_size: int = 1) -> DecodeState:
        return self.graph.init_state(batch_size)

    def step(self, ids: np.ndarray, state: DecodeState) -> tuple[np.ndarray, DecodeState]:
        """One token per row: ``ids`` (B,) int -> logits (B, V) float32 and the new state (``state`` is unchanged)."""
        if self.max_context is not None and state.position >= self.max_context:
            raise SokhanError(f"context of {state.position + 1} tokens exceeds the model's max_context = {self.max_context}")
        return self.graph.step(ids, state)

    def _prefill_graph(self, ids: Sequence[int], batch_size: int) -> tuple[np.ndarray, DecodeState]:
        tokens = np.tile(np.asarray(ids, dtype=np.int64), (batch_size, 1))  # (B, T)
        io = self.prefill_session.io_binding()
        io.bind_cpu_input("input_ids", tokens)
        if self.config["uses_position_ids"]:  # the transformer's; Mamba's prefill takes the tokens alone
            io.bind_cpu_input("position_ids", np.tile(np.arange(len(ids), dtype=np.int64), (batch_size, 1)))
        io.bind_output("logits", "cpu")
        for spec in self.specs:
            io.bind_output(spec.output, self.device, 0)
        self.prefill_session.run_with_iobinding(io)
        out = io.get_outputs()
        return out[0].numpy(), DecodeState(list(out[1:]), len(ids))

    def language(self, text: str, lang: str | None = None) -> str:
        """``lang``, or the language detected in ``text``; English, with a one-time notice, where none is."""
        from sokhan.tokenization import detect_language

        if lang is not None:
            return lang
        lang = detect_language(text)
        if lang is None:  # no Arabic-script, Han or Latin words (Cyrillic, kana, digits, a URL alone)
            # An empty prompt is an error of its own, said without a notice first ('\u200b' normalizes to nothing).
            if not self.tokenizer.encode(text, lang="en"):
                raise SokhanError(f"empty prompt {text!r}: give at least one character of text")
            if None not in self._warned:
                self._warned.add(None)
                print(f"sokhan: {text[:30]!r} has no Persian, Chinese or Latin words (a URL or an e-mail address is "
                      "none); it is read as English text, "
                      "and its predictions will be poor (--lang sets the language)", file=sys.stderr)
            return "en"
        return lang

    def encode_prompt(self, text: str, lang: str | None = None) -> list[int]:
        """Token ids of a prompt as training saw a line: the language tag, then the text's tokens."""
        lang = self.language(text, lang)
        trained = self.config.get("languages")
        if trained and lang not in trained and lang not in self._warned:
            self._warned.add(lang)
            print(f"sokhan: this model was trained on {', '.join(trained)} text only; it has not seen {lang}, "
                  "and its predictions for this prompt will be poor", file=sys.stderr)
        ids = self.tokenizer.encode(text, lang=lang)
        if not ids:  # "" or only spaces: the language tag alone is no prompt (and prefill's own check never sees it)
            raise SokhanError(f"empty prompt {text!r}: give at least one character of text")
        return [self.tokenizer.lang_id(lang), *ids]

    def prefill(self, ids: Sequence[int], batch_size: int = 1) -> tuple[np.ndarray, DecodeState]:
        """Run the prompt ``ids`` from an empty state; returns the last logits (B, V) and the state after it.

        With a prefill graph in the bundle the prompt goes through it in one call, else token by token.
        """
        if not ids:
            raise SokhanError("empty prompt: give at least one character of text")
        if self.max_context is not None and len(ids) > self.max_context:
            raise SokhanError(f"prompt of {len(ids)} tokens exceeds the model's max_context = {self.max_context}")
        if self.prefill_session is not None:
            return self._prefill_graph(ids, batch_size)
        state = self.init_state(batch_size)
        logits = None
        for i in ids:
            logits, state = self.step(np.full(batch_size, i, dtype=np.int64), state)
        return logits, state

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int | None = None,
        lang: str | None = None,
    ) -> str:
        """The continuation of ``prompt`` (without the prompt): greedy at temperature 0, else sampled.

        Stops at ``<|eos|>``, after ``max_new_tokens`` tokens, or when the context reaches the model's maximum.
        """
        _integer("max_new_tokens", max_new_tokens, 0)
        _integer("top_k", top_k, 1, optional=True)
        _integer("seed", seed, 0, optional=True)
        # nan would reach rng.choice as nan probabilities
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
                temperature >= 0 and np.isfinite(temperature)):
            raise SokhanError(f"temperature = {temperature!r} must be a finite number >= 0 (0 = greedy)")
        rng = np.random.default_rng(seed)
        ids = self.encode_prompt(prompt, lang)
        logits, state = self.prefill(ids)
        # Stepped in place: a recurrent state of fixed size by StepLoop, a KV cache by CacheLoop where the graph
        # can append in place (else through the step API, which copies the cache every token).
        if not self.config["uses_position_ids"]:
            loop: StepLoop | CacheLoop | None = StepLoop(self.graph, state)
        elif self.config.get("kv_share_buffer"):
            reach = state.position + max_new_tokens
            loop = CacheLoop(self.graph, state, min(reach, self.max_context) if self.max_context else reach)
        else:
            loop = None
        # Language tags, bos and pad never occur inside a line (training never predicts them): a sampled one would
        # be fed back and then left out of the text without a word. <|eos|> stays, it ends the line.
        banned = np.array([i for i in self.config["special_tokens"].values() if i != self.eos], dtype=np.int64)
        new: list[int] = []
        for n in range(max_new_tokens):
            logits = np.array(logits, dtype=np.float32, copy=True)
            logits[:, banned] = -np.inf
            token = int(sample(logits, temperature, top_k, rng)[0])
            if token == self.eos:
                break
            new.append(token)
            position = loop.position if loop is not None else state.position
            if n + 1 == max_new_tokens or (self.max_context is not None and position >= self.max_context):
                break
            if loop is not None:
                logits = loop.step(np.array([token]))
            else:
                logits, state = self.step(np.array([token]), state)
        return self.tokenizer.decode(new)

    def next_words(self, text: str, k: int = 5, lang: str | None = None, **search) -> list[tuple[str, float]]:
        """The ``k`` most likely next words after ``text`` with their probabilities (see ``sokhan.export.nextword``)."""
        from sokhan.export.nextword import default_splitter, ends_inside_word, next_words

        _integer("k", k, 1)
        lang = self.language(text, lang)
        logits, state = self.prefill(self.encode_prompt(text, lang))
        if self.max_context is not None and state.position >= self.max_context:
            # One more token would fit the context, but not the step that sees whether the word ends there.
            raise SokhanError(f"prompt of {state.position} tokens fills the model's max_context = {self.max_context}: "
                              "no room left to spell a next word; shorten it")
        search.setdefault("max_tokens", 8)
        if self.max_context is not None:  # the search steps max_tokens - 1 times at most: stay inside the context
            search["max_tokens"] = max(1, min(search["max_tokens"], self.max_context - state.position + 1))
        after_word = ends_inside_word(self.tokenizer.normalize(text, lang), lang)
        return next_words(self.step, state, logits[0], self.tokenizer, take=self.graph.take, k=k, lang=lang,
                          split=default_splitter(self.tokenizer, lang), after_word=after_word, **search)
