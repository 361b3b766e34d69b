"""The one error type users see: a list of problems, each naming key, value and fix.

The CLI prints every problem at once and exits with code 2; no traceback.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    key: str
    """Config key or argument at fault, e.g. `data.eval_size`."""
    value: object
    """The bad value as the user gave it."""
    fix: str
    """What is wrong and what to do instead."""

    def __str__(self) -> str:
        return f"{self.key}={self.value!r}: {self.fix}"


class CompressError(Exception):
    """Bad input: one or more problems the user can fix. Exit code 2."""

    def __init__(self, problems: list[Problem] | Problem, title: str = "invalid input"):
        self.problems = [problems] if isinstance(problems, Problem) else list(problems)
        self.title = title
        super().__init__(self.render())

    def render(self) -> str:
        n = len(self.problems)
        head = f"{self.title} ({n} problem{'s' if n != 1 else ''}):"
        return "\n".join([head] + [f"  - {p}" for p in self.problems])


def raise_if(problems: list[Problem], title: str = "invalid input") -> None:
    """Raise one CompressError listing every problem, if there are any."""
    if problems:
        raise CompressError(problems, title)
