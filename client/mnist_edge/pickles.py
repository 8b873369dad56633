"""A pickle's shape, read from its opcodes before any unpickler builds it: size and nesting depth.

``torch.load(weights_only=True)`` executes no code, but it still builds whatever the pickle
describes, and some shapes crash the process instead of raising: a dict key that is a tuple nested
300,000 deep makes CPython hash it recursively in C until the stack overflows (SIGSEGV). So the
``data.pkl`` of a ``.pth`` is scanned first with :func:`pickletools.genops` (which only decodes
opcodes), replaying the unpickler's stack with each object's nesting depth in place of the object.
The depth of a container is one more than its deepest member when it is built or filled; a list or
dict filled after it was nested (through the memo) is counted at its depth when nested, which is
enough for what crashes: tuples and frozensets, the hashable containers, are never filled later.
"""

from __future__ import annotations

import pickletools
import zipfile
import zlib
from pathlib import Path

from .errors import UserError

MAX_PICKLE_BYTES = 64 << 10
"""Largest pickle read: a state_dict's holds names and storage keys only (this CNN's: under 1 KB), and
scanning 64 KiB of opcodes takes a fraction of a second."""
MAX_DEPTH = 100
"""Deepest nesting allowed: a state_dict nests a few levels (dict, tensor rebuild, its arguments)."""
_IN_PLACE = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}
_PUT = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET = {"GET", "BINGET", "LONG_BINGET"}


class PickleShapeError(UserError, ValueError):
    """A pickle too large, too deep or not decodable to be a state_dict; nothing was unpickled."""


class _Cell:
    """One object of the replayed stack: only its depth."""

    __slots__ = ("depth",)

    def __init__(self, depth: int) -> None:
        self.depth = depth


_MARK = _Cell(-1)


def check(blob: bytes, source: str, max_depth: int = MAX_DEPTH) -> int:
    """The nesting depth of the pickle ``blob``; :class:`PickleShapeError` naming ``source`` if it is too big
    or nests deeper than ``max_depth``. A malformed pickle is scanned up to where it breaks (the unpickler
    fails there too, with its own error)."""
    if len(blob) > MAX_PICKLE_BYTES:
        raise PickleShapeError(f"{source}: its pickle is {len(blob):,} bytes, more than the {MAX_PICKLE_BYTES:,} "
                               "a state_dict's can need")
    stack: list[_Cell] = []
    memo: dict[int, _Cell] = {}
    deepest = 0
    try:
        for opcode, arg, _position in pickletools.genops(blob):
            cell = _step(opcode, arg, stack, memo)
            if cell is not None:
                deepest = max(deepest, cell.depth)
                if deepest > max_depth:
                    raise PickleShapeError(f"{source}: its pickle nests more than {max_depth} levels deep; "
                                           "a state_dict nests a few")
    except PickleShapeError:
        raise
    except (ValueError, IndexError, KeyError):
        pass  # malformed from here on: every opcode before was within bounds, and the unpickler stops here too
    return deepest


def check_zip(path: Path) -> None:
    """:func:`check` every pickle of a ``.pth`` zip, read by entry (a name may be in a zip twice)."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".pkl"):
                    continue
                source = f"{path}: entry {short(info.filename)}"
                if info.file_size > MAX_PICKLE_BYTES:
                    raise PickleShapeError(f"{source} declares {info.file_size:,} bytes, more than the "
                                           f"{MAX_PICKLE_BYTES:,} a state_dict's pickle can need")
                with archive.open(info) as member:
                    check(member.read(MAX_PICKLE_BYTES + 1), source)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
        raise PickleShapeError(f"{path}: not a readable .pth zip ({error})") from None


def short(value: object, limit: int = 60) -> str:
    """A name from a file, for a message: a string cut to ``limit`` characters, anything else its type."""
    if not isinstance(value, str):
        return f"<a {type(value).__name__}>"
    return value if len(value) <= limit else value[:limit] + "..."


def _pop_mark(stack: list[_Cell]) -> list[_Cell]:
    items = []
    while (top := stack.pop()) is not _MARK:
        items.append(top)
    return items


def _step(opcode: pickletools.OpcodeInfo, arg: object, stack: list[_Cell], memo: dict[int, _Cell]) -> _Cell | None:
    """Replay one opcode on ``stack``; returns the object it made or filled, if any."""
    name = opcode.name
    if name == "MARK":
        stack.append(_MARK)
        return None
    if name in _PUT:
        memo[int(arg)] = stack[-1]
        return None
    if name == "MEMOIZE":
        memo[len(memo)] = stack[-1]
        return None
    if name in _GET:
        stack.append(memo[int(arg)])
        return None
    if name == "DUP":
        stack.append(stack[-1])
        return None
    before = opcode.stack_before
    marked = pickletools.markobject in before
    members = _pop_mark(stack) if marked else []
    below = before.index(pickletools.markobject) if marked else len(before)
    popped = [stack.pop() for _ in range(below)][::-1]
    if name in _IN_PLACE:  # the container is the first item below; the rest are its new members
        container, members = popped[0], members + popped[1:]
        container.depth = max([container.depth] + [m.depth + 1 for m in members])
        stack.append(container)
        return container
    if not opcode.stack_after:
        return None
    made = _Cell(max((m.depth + 1 for m in members + popped), default=0))
    stack.extend(made for _ in opcode.stack_after)
    return made
