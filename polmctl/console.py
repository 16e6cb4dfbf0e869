"""The process-wide rich console every part of polmctl prints to (stderr; stdout is left to
commands whose output is data, e.g. ``polmctl show`` or ``polmctl runs --json``)."""

from rich.console import Console

console = Console(stderr=True)
