"""One rich console (stderr) for messages and progress bars, so stdout stays for tables and JSON."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
out = Console(width=None if Console().is_terminal else 240)  # logs: room for the results table and its intervals


def progress() -> Progress:
    """A transient progress bar on stderr (silent when stderr is not a terminal)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
                    disable=not console.is_terminal)


def say(message: str) -> None:
    """One message, never wrapped at the console width: a line a user greps for stays whole."""
    console.print(message, highlight=False, soft_wrap=True)
