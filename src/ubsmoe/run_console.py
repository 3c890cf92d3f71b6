"""The run's console: the terminal and the run directory's ``train.log`` get the same text.

Rich crops tables to 80 columns when output is not a terminal (a file, a pipe, a batch
job's log), which silently cut metric columns; here a non-terminal gets a wide console,
and ``train.log`` always gets the full-width text without colour codes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rich.console import Console

LOG_WIDTH = 200  # columns for files: wide enough for every per-tier metric table


class RunConsole:
    """``print`` and ``rule`` go to the terminal and, once :meth:`log_to` is called, to a log file."""

    def __init__(self) -> None:
        tty = sys.stdout.isatty()
        self.terminal = Console(width=None if tty else LOG_WIDTH)
        self.file: Console | None = None

    def log_to(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = Console(file=path.open("a", encoding="utf-8"), width=LOG_WIDTH, no_color=True, force_terminal=False)

    def print(self, *objects: Any, **kwargs: Any) -> None:
        self.terminal.print(*objects, **kwargs)
        if self.file is not None:
            self.file.print(*objects, **kwargs)
            self.file.file.flush()

    def rule(self, *args: Any, **kwargs: Any) -> None:
        self.terminal.rule(*args, **kwargs)
        if self.file is not None:
            self.file.rule(*args, **kwargs)
            self.file.file.flush()
