"""sokhan: Persian / Chinese / English next-word language models, from raw text to an ONNX decoder.

The installed namespace joins the repository's folders: ``sokhan.tokenization`` (text, no torch),
``sokhan.kernels`` (ops and their references), ``sokhan.pipeline`` (models, stages, CLI) and
``sokhan.export`` (ONNX export and the torch-free runtime).
"""

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
