"""The line of a data file that its reader refused, as the user's editor numbers it.

The readers under ``datasets`` report where they failed in their own terms: pyarrow's JSON
reader says ``in row 2`` (counted from 0, blank lines skipped, within a 10 MiB block), the UTF-8
decoder a byte offset into a block, and pyarrow accepts bytes that are not UTF-8 at all (they
fail later, far from the file). These functions read the file again, decompressed as
:mod:`.sources` reads it, and find the physical line (counted from 1) at fault. They run only
once reading has failed.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
from collections.abc import Iterator
from pathlib import Path

#: Compressions the standard library reads (``.zst`` needs a package that is not installed
#: everywhere: its files are not searched).
SEARCHED = (".gz", ".bz2", ".xz")


def _open(path: Path, compression: str | None) -> io.BufferedIOBase:
    if compression == ".gz":
        return gzip.GzipFile(path, "rb")
    if compression == ".bz2":
        return bz2.BZ2File(path, "rb")
    if compression == ".xz":
        return lzma.LZMAFile(path, "rb")
    return open(path, "rb")


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def _lines(path: Path, compression: str | None) -> Iterator[tuple[int, bytes]] | None:
    """``(line number, raw line)`` of the file's (decompressed) content, or ``None``."""
    if compression is not None and compression not in SEARCHED:
        return None

    def read() -> Iterator[tuple[int, bytes]]:
        with _open(path, compression) as f:
            yield from enumerate(f, start=1)

    return read()


def first_non_utf8(path: Path, compression: str | None) -> tuple[int, int, str] | None:
    """``(line, column, reason)`` of the first byte that is not UTF-8 (column counted from 1)."""
    lines = _lines(path, compression)
    for number, raw in lines or ():
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return number, e.start + 1, str(e.reason)
    return None


def first_bad_json_line(path: Path, compression: str | None) -> tuple[int, str] | None:
    """``(line, what is wrong)`` of the first line of JSON Lines that is not a JSON object.

    A ``.json`` file that holds one JSON document (an array of objects, say) is parsed whole,
    and a syntax error is reported at its line; ``None`` if nothing is found.
    """
    lines = _lines(path, compression)
    if lines is None:
        return None
    if path.name.lower().removesuffix(compression or "").endswith(".json"):
        text = b"".join(raw for _, raw in lines).decode("utf-8", errors="replace")
        try:
            json.loads(text)
            return None  # one valid document: the fault is not its syntax
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # (extra data: JSON Lines in a .json file)
                return e.lineno, e.msg
        lines = _lines(path, compression)
    for number, raw in lines or ():
        text = raw.decode("utf-8", errors="replace").strip()
        if not text:
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            return number, f"not valid JSON ({e.msg}, column {e.colno})"
        if not isinstance(value, dict):
            return number, f"a JSON {_JSON_TYPES.get(type(value), 'value')}, not an object"
    return None
