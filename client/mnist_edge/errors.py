"""The one base class of every error a user can fix: its message is complete and names what is wrong.

The command line prints such an error as one line and exits 2; the edge callbacks let it fail the
task, so its message is what the server reads. Nothing else is caught that way: any other exception
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input (a file, a setting, a path, a node variable): the message says which and what was expected."""

    local_message: str | None = None
    """A fuller message for the person at this machine (the command line prints it instead); never
    sent to a server: it may quote a file the node holds (see :class:`mnist_edge.shards.HeaderError`)."""
