"""Reading corpus files: which files a source names, and their lines as text, with the UTF-8 error policy.

A corpus source is a file or a directory (every ``*.txt`` below it, sorted). Files are read as bytes and split on
``\\n``, so line numbers in messages are the ones an editor shows. A NUL byte means a binary file, which is refused
whatever the policy. Invalid UTF-8 follows ``errors``: ``strict`` stops with the file and line, ``replace`` puts
U+FFFD in place of the bad bytes, ``skip`` leaves the line out (the caller counts it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Literal

from sokhan import SokhanError

Errors = Literal["strict", "replace", "skip"]


def source_files(path: str | Path) -> list[Path]:
    """The files a source names: the file itself, or every ``*.txt`` under a directory (sorted)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise SokhanError(f"{p}: directory has no *.txt files (a corpus source is a text file or a folder of *.txt)")
        return files
    raise SokhanError(f"{p}: no such file or directory (check corpus.paths)")


def read_lines(path: Path, errors: Errors = "strict") -> Iterator[tuple[int, str | None]]:
    """``(line_number, text)`` for every line of ``path`` (1-based); ``text`` is None for a line skipped as invalid.

    The file is read line by line, so memory does not grow with its size. A NUL byte anywhere means a binary file,
    refused before any line is read (whatever the policy), as a quick first pass over the bytes finds it.
    """
    _refuse_binary(Path(path))
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):  # binary files split on b"\n" only, as the text is split everywhere else
            if raw.endswith(b"\n"):
                raw = raw[:-1]  # the newline ends the line; a final one does not start another
            try:
                yield i, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if errors == "strict":
                    raise SokhanError(
                        f"{path}:{i}: invalid UTF-8 (byte 0x{raw[e.start]:02x}, character "
                        f"{len(raw[: e.start].decode('utf-8', 'replace')) + 1} of the line); "
                        'fix the file or set corpus.errors = "replace" or "skip"'
                    ) from None
                yield i, raw.decode("utf-8", errors="replace") if errors == "replace" else None


def _refuse_binary(path: Path, block: int = 1 << 22) -> None:
    """A SokhanError naming the line and offset of the first NUL byte in ``path``, if it has one."""
    offset, lines = 0, 0
    with open(path, "rb") as f:
        while data := f.read(block):
            nul = data.find(b"\0")
            if nul >= 0:
                line = lines + data.count(b"\n", 0, nul) + 1
                raise SokhanError(f"{path}:{line}: binary file (NUL byte at offset {offset + nul}); corpus files must be UTF-8 text")
            offset += len(data)
            lines += data.count(b"\n")
