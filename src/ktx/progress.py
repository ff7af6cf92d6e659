"""Progress bars on stderr (stdout may carry a program's real output: `ktx bench --output json`).

Only on a terminal: rich's transient bars leave an empty line each when stderr is a pipe or a file, which
filled `ktx bench | tee` logs with blank lines, one per repacked layer.
"""
from __future__ import annotations

from rich.console import Console
from rich.progress import Progress


def progress_bar(*columns, disable: bool = False) -> Progress:
    console = Console(stderr=True)
    return Progress(*columns, console=console, transient=True, disable=disable or not console.is_terminal)
