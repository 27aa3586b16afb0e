"""Progress of the long loops of fastpair-train and fastpair-probe (training epochs, validation, the probe's
fits), on stderr.

On a terminal: tqdm bars that vanish when done (``leave=False``: the epoch's own line replaces them). Elsewhere
(a log file, a batch job's output, a pipe) a bar's carriage returns would pile up into one unreadable line, so
plain lines instead: at most one every ``interval`` seconds (``INTERVAL_S`` = 30 by default; the first after
that long, so a loop shorter than that prints nothing and its epoch line follows at once) or, with
``interval=0`` for work in few long units such as the probe's fits, one per unit:

    [pairwise_nce] epoch 3/40: 120/500 steps (31 s, ~98 s left)
    [probe] pairwise_nce TA: 12/21 fits (40 s, ~30 s left)
"""

from __future__ import annotations

import sys
import time

INTERVAL_S = 30.0  # seconds between two progress lines off a terminal


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """``total`` units of work counted with ``update``: a tqdm bar on a terminal, lines elsewhere (see the
    module docstring). ``enabled=False`` (torchrun's ranks other than 0) shows nothing."""

    def __init__(self, total: int, desc: str, unit: str, interval: float | None = None, enabled: bool = True,
                 stream=None, clock=time.monotonic):
        self.total, self.desc, self.unit, self.done, self.enabled = total, desc, unit, 0, enabled
        self.interval = INTERVAL_S if interval is None else interval
        self.stream = sys.stderr if stream is None else stream  # looked up now: tests and callers redirect it
        self.clock = clock
        self.start = self.last = clock()
        self.bar = None
        if enabled and _is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=f" {unit}", leave=False, file=self.stream)

    def update(self, what: str = "") -> None:
        """One more unit done; ``what`` names it (the probe's "pairwise_nce TA")."""
        self.done += 1
        if self.bar is not None:
            if what:
                self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(1)
        elif self.enabled:
            now = self.clock()
            if now - self.last >= self.interval:
                self.last = now
                print(self.line(what), file=self.stream, flush=True)

    def line(self, what: str = "") -> str:
        seconds = self.last - self.start
        left = f", ~{seconds / self.done * (self.total - self.done):.0f} s left" if self.done < self.total else ""
        return f"{self.desc}{' ' + what if what else ''}: {self.done}/{self.total} {self.unit} ({seconds:.0f} s{left})"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def track(items, total: int, desc: str, unit: str, enabled: bool = True):
    """Iterate over ``items`` (``total`` of them), counting each once its loop body is done."""
    progress = Progress(total, desc, unit, enabled=enabled)
    try:
        for item in items:
            yield item
            progress.update()
    finally:
        progress.close()
