"""Progress of a verb over many shards: a tqdm bar on a terminal, nothing otherwise.

The bar (shards done of total, images/s, time left) goes to stderr, and only when stderr is a
terminal and the output is not ``--json``: piped or logged output stays plain lines.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import IO


class Quiet:
    """No bar: output that is not a terminal, or ``--json``."""

    enabled = False

    def step(self, images: int = 0) -> None:
        pass

    def external(self):
        return contextlib.nullcontext()

    def close(self) -> None:
        pass

    def __enter__(self) -> Quiet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Bar(Quiet):
    """A tqdm bar over ``total`` shards; ``step(images)`` after each, for the images/s figure."""

    enabled = True

    def __init__(self, total: int, stream: IO[str], desc: str, item: str) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bar = tqdm(total=total, file=stream, desc=desc, unit="shard", dynamic_ncols=True, leave=True)
        self.images, self.item, self.start = 0, item, time.perf_counter()

    def step(self, images: int = 0) -> None:
        self.images += images
        elapsed = time.perf_counter() - self.start
        if elapsed > 0 and self.images:
            self.bar.set_postfix_str(f"{self.images / elapsed:,.0f} {self.item}/s", refresh=False)
        self.bar.update(1)

    def external(self):
        """Clears the bar while other lines are printed, then draws it again."""
        return self._tqdm.external_write_mode(file=self.bar.fp)

    def close(self) -> None:
        self.bar.close()


def progress(total: int, *, as_json: bool = False, stream: IO[str] | None = None, desc: str = "shards",
             item: str = "images") -> Quiet:
    """A bar when ``stream`` (default stderr) is a terminal, there is more than one shard and the
    output is not JSON; else a :class:`Quiet` that does nothing."""
    stream = stream if stream is not None else sys.stderr
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    if as_json or not tty or total < 2:
        return Quiet()
    return Bar(total, stream, desc, item)
