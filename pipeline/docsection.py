"""Generated sections of the docs: text that a harness or a test writes between two marker lines,
``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``, in a Markdown file (docs/BENCHMARKS.md's tables,
docs/RELIABILITY.md's fault tables). The one place the marker format and the rewrite live."""

from __future__ import annotations

from pipeline import storage
from pipeline.errors import InputError


def markers(name: str) -> tuple[str, str]:
    """The begin and end marker lines of section ``name``."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def block(name: str, section: str) -> str:
    """``section`` between its markers, exactly as a file carries it."""
    begin, end = markers(name)
    return f"{begin}\n{section}\n{end}"


def write(path: str, name: str, section: str) -> None:
    """Replace what lies between section ``name``'s markers in the Markdown file ``path`` with
    ``section``, atomically (``storage.write_text_atomic``). InputError naming the file when it
    lacks either marker, has one twice, or has them in the wrong order: nothing is written."""
    begin, end = markers(name)
    text = storage.read_text(path)
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise InputError(f"{path} needs exactly one {begin} followed by one {end} "
                         f"for the section to be written between them")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    storage.write_text_atomic(path, f"{head}{block(name, section)}{tail}")
