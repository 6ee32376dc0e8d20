"""What a person sees while ftrain runs: plain ``[ftrain]`` lines, or a live rich view.

Both pass the child's own output through. The plain reporter writes its bytes unchanged
(a progress bar redraws itself with ``\\r`` as it would without ftrain). The live view
prints the child's finished lines above a status panel (attempt, step of the total, ETA,
metrics, restarts used of the budget, the last event) and shows a line still being redrawn
with ``\\r`` — a tqdm bar — inside the panel, so the bar moves and no line is ever split.
rich is imported only for the live view.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

_COLORS = {"info": "cyan", "warn": "yellow", "error": "red"}
_TOTAL_KEYS = ("max_steps", "total_steps", "num_steps", "steps", "max_iters", "num_iterations", "iters")


@dataclass(frozen=True)
class Progress:
    """Where the run stands, for the status line."""

    attempt: int
    step: int | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    rate: float | None = None           # steps per second, recent
    total: int | None = None            # the job's last step + 1, when the config says
    restarts: int = 0
    max_restarts: int | None = None
    last_event: str = ""


def total_steps(config: Mapping[str, Any]) -> int | None:
    """The job's length from its config, when a well-known key says it (``train.steps``,
    ``max_steps``, …, at the top or one level down); None otherwise."""
    scopes = [config, *(v for v in config.values() if isinstance(v, Mapping))]
    for key in _TOTAL_KEYS:
        for scope in scopes:
            value = scope.get(key)
            if type(value) is int and value > 0:
                return value
    return None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def status_text(p: Progress) -> str:
    step = "-" if p.step is None else str(p.step)
    parts = [f"attempt {p.attempt}", f"step {step}" + (f"/{p.total}" if p.total else "")]
    if p.total and p.step is not None:
        parts[-1] += f" ({min(p.step + 1, p.total) / p.total:.0%})"
    parts += [f"{k}={_fmt(v)}" for k, v in list(p.metrics.items())[:6] if not isinstance(v, (dict, list))]
    if p.rate:
        parts.append(f"{p.rate:.1f} steps/s")
        if p.total and p.step is not None and p.step + 1 < p.total:
            parts.append(f"ETA {_duration((p.total - p.step - 1) / p.rate)}")
    if p.max_restarts is not None:
        parts.append(f"restarts {p.restarts}/{p.max_restarts}")
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

    def status(self, progress: Progress) -> None:
        now = time.monotonic()
        if now - self._last_status >= self.status_every:
            self._last_status = now
            print(f"[ftrain] {status_text(progress)}", file=self.err, flush=True)

    def close(self) -> None:
        pass


class _Lines:
    """A stream's text cut into finished lines and the line still being drawn: after a
    ``\\r`` only what follows it is kept, as a terminal shows it."""

    def __init__(self) -> None:
        self.partial = ""

    def feed(self, text: str) -> list[str]:
        *done, self.partial = (self.partial + text).split("\n")
        lines = [line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r") for line in done]
        if "\r" in self.partial.rstrip("\r"):
            self.partial = self.partial.rstrip("\r").rsplit("\r", 1)[-1]
        return lines

    @property
    def drawing(self) -> str:
        """The line being drawn, as it shows now."""
        return self.partial.rstrip("\r").rsplit("\r", 1)[-1]

    def flush(self) -> list[str]:
        rest, self.partial = self.drawing, ""
        return [rest] if rest.strip() else []


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
        self._streams = {False: _Lines(), True: _Lines()}
        self._tty = _QuietControlEcho()
        self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=True,
                         redirect_stdout=False, redirect_stderr=False)
        self.live.start()

    def _render(self) -> Any:
        from rich.console import Group
        from rich.panel import Panel

        drawing = [self._Text.from_ansi(s.drawing[-self.console.width + 4:])
                   for s in self._streams.values() if s.drawing.strip()]
        return Panel(Group(*drawing, self._line, self._event), title="ftrain", border_style="cyan", expand=True)

    def output(self, data: bytes, is_err: bool) -> None:
        lines = self._streams[is_err].feed(data.decode("utf-8", "replace"))
        for line in lines:
            self.console.print(self._Text.from_ansi(line), soft_wrap=True, highlight=False)
        self.live.update(self._render())

    def _flush_drawing(self) -> None:
        """A line still being drawn is kept as it stands (a terminal would show it so)."""
        for stream in self._streams.values():
            for line in stream.flush():
                self.console.print(self._Text.from_ansi(line), soft_wrap=True, highlight=False)

    def event(self, message: str, *, level: str = "info") -> None:
        style = _COLORS.get(level, "cyan")
        self._flush_drawing()
        self.console.print(self._Text("[ftrain] ", style=f"bold {style}") + self._Text(message, style=style))
        self._event = self._Text(f"last: {message}", style=style)
        self.live.update(self._render())

    def status(self, progress: Progress) -> None:
        self._line = self._Text(status_text(progress), style="bold")
        self.live.update(self._render())

    def close(self) -> None:
        try:
            self._flush_drawing()
            self.live.update(self._render())
            self.live.stop()
        finally:
            self._tty.restore()


class _QuietControlEcho:
    """Turns off the terminal's echo of control characters (``^C``) while the live view is
    up: the two echoed characters would wrap its last line and leave its border behind."""

    def __init__(self) -> None:
        self._saved: list[Any] | None = None
        try:
            import termios

            if sys.stdin.isatty():
                attrs = termios.tcgetattr(sys.stdin.fileno())
                self._saved = list(attrs)
                attrs[3] &= ~termios.ECHOCTL
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, attrs)
        except (ImportError, OSError, ValueError):
            self._saved = None

    def restore(self) -> None:
        if self._saved is None:
            return
        try:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, self._saved)
        except (OSError, ValueError):
            pass
        self._saved = None


def make_reporter(no_ui: bool) -> PlainReporter | LiveReporter:
    if no_ui or not sys.stderr.isatty() or not sys.stdout.isatty():
        return PlainReporter()
    return LiveReporter()
