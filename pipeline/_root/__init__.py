"""sokhan: Persian / Chinese / English next-word language models, from raw text to an ONNX decoder.

The installed namespace joins the repository's folders: ``sokhan.tokenization`` (text, no torch),
``sokhan.kernels`` (ops and their references), ``sokhan.pipeline`` (models, stages, CLI) and
``sokhan.export`` (ONNX export and the torch-free runtime).
"""

import errno as _errno
import re as _re

__version__ = "0.1.0"


class SokhanError(Exception):
    """A problem the user can fix (a bad file, field or flag).

    The CLI prints ``str(error)`` as one line and exits with status 2; it never shows a traceback for these.
    Say what is wrong and where (file and line, config key, flag), and what would be valid.
    """

    exit_code = 2


class CheckFailed(SokhanError):
    """A produced artefact failed its own check (ONNX parity with PyTorch): one line, exit status 1."""

    exit_code = 1


# What the machine under sokhan refuses, as opposed to what sokhan gets wrong: a full disk or quota, a file size
# limit, a read-only or forbidden folder, a failing device.
MACHINE_ERRNOS = frozenset(getattr(_errno, name) for name in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EACCES", "EPERM", "EIO")
                           if hasattr(_errno, name))


def raised_from(error: BaseException):
    """``error``, then what it was raised from, as Python's traceback shows them: the explicit cause, else the
    exception being handled unless ``from None`` hid it."""
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)


def machine_error(error: BaseException) -> str | None:
    """One line for a failure of the machine (``MACHINE_ERRNOS``) in ``error`` or in what it was raised from
    (libraries wrap it: torch.onnx's exporter does), or from a Rust library's I/O error ("… (os error 28)", as
    safetensors and tokenizers say it). None for anything else: a bug keeps its traceback, a missing file its own
    message."""
    for e in raised_from(error):
        if isinstance(e, OSError) and e.errno in MACHINE_ERRNOS:
            reason = e.strerror or str(e)
            return f"{e.filename}: {reason}" if e.filename else reason
        rust = _re.search(r"([^:]*)\(os error (\d+)\)", str(e))
        if rust and int(rust.group(2)) in MACHINE_ERRNOS:
            return f"{rust.group(1).strip()} (os error {rust.group(2)})"
    return None
