"""Node-name patterns (``--exclude``): one rule for every verb.

A pattern is a **glob** (matched against the whole node name, case-sensitive) when it contains
``*``, ``?`` or ``[`` and nothing that only a regex would: ``^ $ + \\ ( ) { } |`` or ``.*``.
Anything else is a **regular expression searched anywhere** in the name. So ``*ssh*`` and
``stage1.?`` are globs, ``^stem``, ``^stem.*`` and ``conv(1|2)`` are regexes, and a plain word such
as ``ssh`` is a regex that finds the word anywhere.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Callable, Iterable, Sequence

from ..errors import ConfigError

_REGEX_ONLY = re.compile(r"[\^$+\\(){}|]|\.\*")


def node_matcher(pattern: str) -> Callable[[str], bool]:
    """A predicate on node names for one pattern; a broken regex is a one-line ConfigError."""
    if any(ch in pattern for ch in "*?[") and not _REGEX_ONLY.search(pattern):
        return lambda name: fnmatch.fnmatchcase(name, pattern)
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"--exclude {pattern!r} is not a valid glob or regular expression: {exc}") from None
    return lambda name: rx.search(name) is not None


def match_nodes(names: Iterable[str], patterns: Sequence[str]) -> tuple[list[str], list[str]]:
    """(names matched by any pattern, in order, without repeats; patterns that matched no name)."""
    names = [n for n in names if n]
    matched: dict[str, None] = {}
    unmatched = []
    for pattern in patterns:
        match = node_matcher(pattern)
        hits = [n for n in names if match(n)]
        matched.update(dict.fromkeys(hits))
        if not hits:
            unmatched.append(pattern)
    return list(matched), unmatched
