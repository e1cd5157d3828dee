"""The one error type users see.

Every failure that comes from bad input (a missing file, a corrupt tensor, an unsupported
architecture, an unknown type) is raised as :class:`GGQError` with a one-line message that names
the file and the problem. The CLI prints it as ``ggq: error: <message>`` and exits with status 1;
anything else that escapes is a bug in ggq.
"""


class GGQError(Exception):
    """A user-facing error: ``str(err)`` is one line naming the file and the problem."""
