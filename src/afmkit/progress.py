"""Progress of long loops on stderr: a rich bar on a terminal, else a plain log line every N units.

A bar drawn into a file or a pipe is either nothing (rich hides it) or thousands of carriage
returns; a log line every N units (done/total, the loop's own numbers, tokens/s, ETA) is what
a log file or CI output needs, as the Hugging Face Trainer and MaxText print.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class ProgressReporter:
    """``with ProgressReporter("perplexity", total, unit="windows") as p: p.advance(n, tokens=k, ppl="9.1")``.

    ``fields`` passed to ``advance`` (already formatted strings) are shown after done/total;
    ``tokens`` counts work for the tokens/s figure. ``quiet`` shows nothing; ``terminal`` (default:
    whether ``stream`` is one) picks the bar or the log lines; a log line is printed every
    ``log_every`` units (default: every 5% of ``total``) and when the loop ends.
    """

    def __init__(
        self,
        label: str,
        total: int,
        *,
        unit: str = "steps",
        quiet: bool = False,
        log_every: int | None = None,
        stream: TextIO | None = None,
        terminal: bool | None = None,
        completed: int = 0,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.log_every = log_every or max(1, total // 20)
        self.done = completed
        self.start_done = completed
        self.tokens = 0
        self.fields: dict[str, str] = {}
        self.start = time.perf_counter()
        self._next_log = completed + self.log_every
        self._logged_at = completed
        self._bar: Any = None

    def __enter__(self) -> ProgressReporter:
        if not self.quiet and self.terminal:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn(self.label),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(f"{self.unit}  {{task.fields[shown]}}"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=True,
            )
            self._task = self._bar.add_task(self.label, total=self.total, completed=self.done, shown="")
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif not self.quiet and exc[0] is None and self.done != self._logged_at:
            self._log()  # the final line, unless the last advance just printed it

    def advance(self, n: int = 1, *, tokens: int = 0, **fields: str) -> None:
        self.done += n
        self.tokens += tokens
        self.fields.update(fields)
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, shown=self._shown(with_eta=False))
        elif self.done >= self._next_log:
            self._log()
            while self._next_log <= self.done:
                self._next_log += self.log_every

    def _shown(self, *, with_eta: bool) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        parts = [f"{name} {value}" for name, value in self.fields.items()]
        if self.tokens:
            parts.append(f"{self.tokens / elapsed:,.0f} tok/s")
        if with_eta:
            work = self.done - self.start_done
            if self.done >= self.total:
                parts.append(f"done in {_duration(elapsed)}")
            elif work > 0:
                parts.append(f"ETA {_duration(elapsed / work * (self.total - self.done))}")
        return ", ".join(parts)

    def _log(self) -> None:
        self._logged_at = self.done
        percent = 100 * self.done / self.total if self.total else 100.0
        shown = self._shown(with_eta=True)
        line = f"{self.label}: {self.done}/{self.total} {self.unit} ({percent:.0f}%)" + (f", {shown}" if shown else "")
        print(line, file=self.stream, flush=True)
