"""The core's method registry: every method's name, kind, what it needs and its defaults, asked of
the compiled core (`_core.methods()`) rather than restated here."""

from __future__ import annotations

import functools
import json
from typing import Any


@functools.cache
def method_registry() -> dict[str, Any]:
    """`_core.methods()`: every method with what it needs and its defaults."""
    from llmprune import _core

    return json.loads(_core.methods())


def methods(kind: str = "unstructured") -> tuple[str, ...]:
    """The names of the core's methods of one kind (`unstructured` or `structured`)."""
    return tuple(m["name"] for m in method_registry()[kind])
