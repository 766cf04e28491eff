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
    """``(line_number, text)`` for every line of ``path`` (1-based); ``text`` is None for a line skipped as invalid."""
    data = Path(path).read_bytes()
    nul = data.find(b"\0")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise SokhanError(f"{path}:{line}: binary file (NUL byte at offset {nul}); corpus files must be UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        yield from _read_invalid(path, data, errors)
        return
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the file's final newline ends the last line; it does not start another
    yield from enumerate(lines, 1)


def _read_invalid(path: Path, data: bytes, errors: Errors) -> Iterator[tuple[int, str | None]]:
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    for i, raw in enumerate(lines, 1):
        try:
            yield i, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if errors == "strict":
                raise SokhanError(
                    f"{path}:{i}: invalid UTF-8 (byte 0x{raw[e.start]:02x}, character {len(raw[: e.start].decode('utf-8', 'replace')) + 1} "
                    f"of the line); "
                    'fix the file or set corpus.errors = "replace" or "skip"'
                ) from None
            yield i, raw.decode("utf-8", errors="replace") if errors == "replace" else None
