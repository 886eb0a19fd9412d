"""YAML/JSON loading that remembers where every value came from, for errors that name a line.

:func:`load_documents` composes PyYAML's node tree and converts it into :class:`Map` and
:class:`Seq` (``dict`` and ``list`` subclasses that record the line of each key and item).
Plain scalars keep their source text too, so a MAC such as ``12:34:56:00:01:01`` (which YAML
1.1 reads as a base-60 integer) is still available as typed. :class:`Reporter` collects errors
as ``file:line: field: message``.
"""

from __future__ import annotations

import yaml

from ..errors import InputError


class Map(dict):
    """A mapping with the 1-based line of itself, of each key, and the raw text of scalars."""

    __slots__ = ("line", "key_lines", "raw")

    def __init__(self, line: int = 0):
        super().__init__()
        self.line = line
        self.key_lines: dict = {}
        self.raw: dict = {}

    def line_of(self, key) -> int:
        return self.key_lines.get(key, self.line)


class Seq(list):
    """A sequence with the line of itself and of each item."""

    __slots__ = ("line", "item_lines", "raw")

    def __init__(self, line: int = 0):
        super().__init__()
        self.line = line
        self.item_lines: list = []
        self.raw: list = []

    def line_of(self, i: int) -> int:
        return self.item_lines[i] if 0 <= i < len(self.item_lines) else self.line


class PolicyError(InputError):
    """One or more problems in policy input; ``errors`` holds every message found."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(errors[0] + more)


class Reporter:
    """Collects ``file:line: field: message`` errors; :meth:`raise_if_any` raises them."""

    def __init__(self):
        self.errors: list[str] = []

    def error(self, path: str, line: int | None, field: str, message: str) -> None:
        where = f"{path}:{line}" if line else f"{path}"
        self.errors.append(f"{where}: {field}: {message}" if field else f"{where}: {message}")

    def raise_if_any(self) -> None:
        if self.errors:
            raise PolicyError(self.errors)


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: same marks, faster
MAX_NODES = 2_000_000  # aliases can expand a small file enormously ("billion laughs")


def _convert(loader: yaml.SafeLoader, node, depth: int = 0, budget=None):
    if budget is None:
        budget = [MAX_NODES]
    budget[0] -= 1
    if budget[0] < 0:
        raise _MarkedError(node.start_mark.line + 1, "document expands to too many values")
    if depth > 64:
        raise _MarkedError(node.start_mark.line + 1, "nesting deeper than 64 levels (or a recursive alias)")
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves '<<' merge keys
        out = Map(line)
        for knode, vnode in node.value:
            if not isinstance(knode, yaml.ScalarNode):
                raise _MarkedError(knode.start_mark.line + 1, "mapping keys must be plain values")
            key = loader.construct_object(knode)
            if key in out:
                raise _MarkedError(knode.start_mark.line + 1, f"duplicate key {key!r}")
            out[key] = _convert(loader, vnode, depth + 1, budget)
            out.key_lines[key] = (
                vnode.start_mark.line + 1
                if not isinstance(vnode, (yaml.MappingNode, yaml.SequenceNode))
                else knode.start_mark.line + 1
            )
            if isinstance(vnode, yaml.ScalarNode):
                out.raw[key] = vnode.value
        return out
    if isinstance(node, yaml.SequenceNode):
        seq = Seq(line)
        for item in node.value:
            seq.append(_convert(loader, item, depth + 1, budget))
            seq.item_lines.append(item.start_mark.line + 1)
            seq.raw.append(item.value if isinstance(item, yaml.ScalarNode) else None)
        return seq
    return loader.construct_object(node)


class _MarkedError(Exception):
    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line


def load_documents(text: str, path: str) -> list:
    """Every YAML document in ``text`` as Map/Seq/scalars (JSON is YAML, so it loads too).

    Raises :class:`PolicyError` naming the file and line of a syntax error.
    """
    loader = _Loader(text)
    docs = []
    try:
        while loader.check_node():
            node = loader.get_node()
            docs.append(None if node is None else _convert(loader, node))
    except _MarkedError as exc:
        raise PolicyError([f"{path}:{exc.line}: {exc}"]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        msg = exc.problem or str(exc)
        if exc.context:
            msg = f"{exc.context}, {msg}"
        raise PolicyError([f"{path}:{line}: YAML syntax error: {msg}"]) from None
    except yaml.reader.ReaderError as exc:
        # a character YAML refuses (control characters, bad UTF-8): name the line it is on
        line = text.count("\n", 0, exc.position) + 1 if isinstance(text, str) else None
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        where = f"{path}:{line}" if line is not None else path
        raise PolicyError(
            [f"{where}: YAML error: unacceptable character #x{char:04x}: {exc.reason}"]
        ) from None
    except (yaml.YAMLError, ValueError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PolicyError([f"{path}: YAML error: {first}"]) from None
    finally:
        loader.dispose()
    return docs


def read_text(path: str) -> str:
    """The text of ``path``; unreadable or non-UTF-8 files raise InputError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text (byte {exc.start})", path) from None
