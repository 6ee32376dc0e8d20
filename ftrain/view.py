"""What a person sees while ftrain runs: plain ``[ftrain]`` lines, or a live rich view.

Both pass the child's own output through unchanged. The live view keeps a status panel
(attempt, step, metrics, steps/s, last event) under it; rich is imported only for that.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

_COLORS = {"info": "cyan", "warn": "yellow", "error": "red"}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def status_text(attempt: int, step: int | None, metrics: Mapping[str, Any], rate: float | None) -> str:
    parts = [f"attempt {attempt}", f"step {step if step is not None else '-'}"]
    parts += [f"{k}={_fmt(v)}" for k, v in list(metrics.items())[:6] if not isinstance(v, (dict, list))]
    if rate is not None:
        parts.append(f"{rate:.1f} steps/s")
    return "  ".join(parts)


class PlainReporter:
    """Lines prefixed ``[ftrain]`` on stderr; a status line every ``status_every`` seconds."""

    def __init__(self, err: TextIO | None = None, status_every: float = 30.0) -> None:
        self.err = err or sys.stderr
        self.status_every = status_every
        self._last_status = time.monotonic()

    def output(self, data: bytes, is_err: bool) -> None:
        stream = sys.stderr if is_err else sys.stdout
        buffer = getattr(stream, "buffer", None)
        if buffer is not None:
            buffer.write(data)
            buffer.flush()
        else:
            stream.write(data.decode("utf-8", "replace"))

    def event(self, message: str, *, level: str = "info") -> None:
        print(f"[ftrain] {message}", file=self.err, flush=True)

    def status(self, attempt: int, step: int | None, metrics: Mapping[str, Any], rate: float | None,
               last_event: str) -> None:
        now = time.monotonic()
        if now - self._last_status >= self.status_every:
            self._last_status = now
            print(f"[ftrain] {status_text(attempt, step, metrics, rate)}", file=self.err, flush=True)

    def close(self) -> None:
        pass


class LiveReporter:
    """A rich live panel under the child's output, for a terminal."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        self._Text = Text
        self.console = Console(stderr=True)
        self._line = Text("starting…")
        self._event = Text("")
        self.live = Live(self._render(), console=self.console, refresh_per_second=4,
                         redirect_stdout=True, redirect_stderr=True, transient=True)
        self.live.start()

    def _render(self) -> Any:
        from rich.console import Group
        from rich.panel import Panel

        return Panel(Group(self._line, self._event), title="ftrain", border_style="cyan", expand=True)

    def output(self, data: bytes, is_err: bool) -> None:
        stream = sys.stderr if is_err else sys.stdout  # rich's proxies while the view is live
        stream.write(data.decode("utf-8", "replace"))
        stream.flush()

    def event(self, message: str, *, level: str = "info") -> None:
        style = _COLORS.get(level, "cyan")
        self.console.print(self._Text("[ftrain] ", style=f"bold {style}") + self._Text(message, style=style))
        self._event = self._Text(f"last: {message}", style=style)
        self.live.update(self._render())

    def status(self, attempt: int, step: int | None, metrics: Mapping[str, Any], rate: float | None,
               last_event: str) -> None:
        self._line = self._Text(status_text(attempt, step, metrics, rate), style="bold")
        self.live.update(self._render())

    def close(self) -> None:
        self.live.stop()


def make_reporter(no_ui: bool) -> PlainReporter | LiveReporter:
    if no_ui or not sys.stderr.isatty() or not sys.stdout.isatty():
        return PlainReporter()
    return LiveReporter()
