"""Filling prompt templates with a row: the workers render prompts with it, and the gateway
bounds their length with it at submit time, so both count the same characters."""

from __future__ import annotations

import re
from typing import Any

PLACEHOLDER = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})")


def render_user_text(template: str, row: dict[str, Any]) -> str:
    """Fill ``{column}`` placeholders from the row; ``{{`` and ``}}`` stand for literal braces."""

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        return str(row[name]) if name in row and row[name] is not None else match.group(0)

    text = PLACEHOLDER.sub(fill, template)
    return text.replace("{{", "{").replace("}}", "}")


class PromptLength:
    """The length of a template rendered with any row, without rendering it whole each time:
    the gateway checks rows x candidates prompts at submit time."""

    def __init__(self, template: str, system_prompt: str | None = None):
        self.template = template
        self.system = len(system_prompt or "")
        self.names = PLACEHOLDER.findall(template)
        self.fixed = len(PLACEHOLDER.sub("", template))

    def upper_bound(self, row: dict[str, Any]) -> int:
        """At least the characters of the system prompt plus the template filled with ``row``:
        doubled braces, in the template or in a cell, collapse when rendered."""
        bound = self.system + self.fixed
        for name in self.names:
            value = row.get(name)
            bound += len(str(value)) if value is not None else len(name) + 2
        return bound

    def exceeds(self, row: dict[str, Any], limit: int) -> int | None:
        """The rendered length when it is over ``limit``, else None; renders only rows whose
        upper bound is over it."""
        if self.upper_bound(row) <= limit:
            return None
        exact = self.system + len(render_user_text(self.template, row))
        return exact if exact > limit else None
