"""Stage progress on stderr: a spinner on a terminal, plain lines otherwise, nothing when quiet."""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


class Progress:
    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._console = None
        self.timings: dict[str, float] = {}

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console
            self._console = Console(file=self.stream, highlight=False, soft_wrap=True)
            if not self._console.is_terminal:
                self._console = Console(file=self.stream, highlight=False, soft_wrap=True, width=120)
        return self._console

    @property
    def interactive(self) -> bool:
        return self.enabled and self.console.is_terminal

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        """Time a stage; show a spinner while it runs (terminal) and one line when it ends."""
        start = time.perf_counter()
        label = f"{name} {detail}".strip()
        ok = False
        try:
            if self.interactive:
                with self.console.status(f"{label} ..."):
                    yield
            else:
                yield
            ok = True
        finally:
            took = time.perf_counter() - start
            self.timings[name] = self.timings.get(name, 0.0) + took
            # A failure is reported once, by the caller's error line, so stderr stays one line.
            if self.enabled and ok:
                self.console.print(f"[graphopt] {label}: done in {took:.2f} s", markup=False)

    PLAIN_EVERY_S = 10.0  # without a terminal (CI logs, nohup), a line at most this often on long loops

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        """A progress bar over work items (e.g. layers); without a terminal, a plain "done/total" line every
        PLAIN_EVERY_S seconds, so a long quantization is not silent in a log."""
        if not self.interactive:
            if not self.enabled:
                yield from items
                return
            items = list(items)
            total = total or len(items)
            start = last = time.perf_counter()
            for i, item in enumerate(items, 1):
                yield item
                now = time.perf_counter()
                if now - last >= self.PLAIN_EVERY_S and i < total:
                    self.info(f"{description} {i}/{total} ({now - start:.0f} s)")
                    last = now
            return
        from rich.progress import track
        yield from track(items, description=description, total=total, console=self.console, transient=True)

    def info(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"[graphopt] {message}", markup=False)
