"""The one error type users see, and how values are shown inside its message.

Every failure that comes from bad input (a missing file, a corrupt tensor, an unsupported
architecture, an unknown type) is raised as :class:`GGQError` with a one-line message that names
the file and the problem. The CLI prints it as ``ggq: error: <message>`` and exits with status 1;
anything else that escapes is a bug in ggq (the CLI reports it as one line too, ``ggq: internal
error``, never as a traceback).

Values taken from a file (keys, tensor names, strings) go into messages through :func:`show`:
non-printable characters escaped, long values cut, so a corrupt name cannot print kilobytes of
binary or break the line.
"""

from __future__ import annotations

#: longest value :func:`show` prints, in characters (before the "..." it appends)
SHOW_LIMIT = 80
#: longest message :func:`one_line` lets through
LINE_LIMIT = 1000


class GGQError(Exception):
    """A user-facing error: ``str(err)`` is one line naming the file and the problem."""


def _pieces(s: str):
    for c in s:
        if c.isprintable() and c not in "\u2028\u2029":
            yield c
        else:
            o = ord(c)
            yield f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def _cut(s: str, limit: int) -> tuple[str, bool]:
    out, n = [], 0
    for p in _pieces(s):
        if n + len(p) > limit:
            return "".join(out), True
        out.append(p)
        n += len(p)
    return "".join(out), False


def escape(s: str, limit: int | None = None) -> str:
    """``s`` with non-printable characters escaped (``\\x00``, ``\\n``, ``\\u2028``); with
    ``limit``, cut after that many output characters (never inside an escape) and ``...`` added."""
    if limit is None:
        return "".join(_pieces(s))
    text, cut = _cut(s, limit)
    return text + "..." if cut else text


def show(value, limit: int = SHOW_LIMIT) -> str:
    """``value`` for an error message: strings (bytes decoded with escapes) quoted, non-printable
    characters escaped (``\\x00``, ``\\n``), cut to ``limit`` printed characters with ``...``; other
    values by their ``repr``, cut the same way."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, str):
        text, cut = _cut(value.replace("'", "\\'"), limit)
        return f"'{text}'" + ("..." if cut else "")
    return escape(repr(value), limit)


def one_line(message: str, limit: int = LINE_LIMIT) -> str:
    """``message`` as one printable line of at most ``limit`` characters (for the CLI's last word)."""
    return escape(str(message), limit)
