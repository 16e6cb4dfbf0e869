"""The process-wide rich console every part of polmctl prints to (stderr; stdout is left to
commands whose output is data, e.g. ``polmctl show`` or ``polmctl runs --json``)."""

from rich.console import Console
from rich.markup import escape

console = Console(stderr=True)


def warn(text: str) -> None:
    """One ``warning:`` line on the console; ``text`` is plain text (brackets in it are not markup)."""
    console.print(f"[bold yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)
