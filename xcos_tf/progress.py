"""Progress on stderr for every long loop: a bar on a terminal, plain periodic lines in a log.

A bar redrawn with carriage returns and ANSI codes becomes one huge unreadable line in a log
file (`> train.log 2>&1`). So when the stream is not a terminal, progress is written as plain
lines, one every `LINE_INTERVAL` seconds and one at the end:

    faces 1200/19458 (6%) 130/s

```python
for item in progress.bar(items, description="faces", unit="img"):
    ...
with progress.bar(total=n, description="feature maps") as bar:
    bar.update(batch_size)
steps = progress.step_bar(train_steps, show=chief)  # the trainer's: keras Progbar on a terminal
steps.update(step, [("loss", 0.1)])
```
"""
import sys
import time

LINE_INTERVAL = 10.0  # seconds between two lines in a log file


def is_terminal(stream):
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class LineProgress:
    """The part of tqdm's interface the tools use (iteration, `update`, `close`, `with`),
    printing plain lines `description done/total (p%) rate/s [values]` at most every
    `interval` seconds, and a last one on `close`. No carriage return, no ANSI code."""

    def __init__(self, iterable=None, total=None, initial=0, description="", unit="it", file=None,
                 interval=LINE_INTERVAL, show=True):
        self.iterable = iterable
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.count, self.initial = total, initial, initial
        self.description, self.unit, self.interval, self.show = description, unit, interval, show
        self.file = file
        self._start = self._last = time.monotonic()
        self._printed_count, self._closed, self._values = None, False, []

    def update(self, n=1):
        self.update_to(self.count + n)

    def update_to(self, count, values=()):
        """Sets the absolute count (and the values shown after it, [(name, number)])."""
        self.count, self._values = count, list(values)
        if time.monotonic() - self._last >= self.interval:
            self._write()

    def _write(self):
        if not self.show:
            return
        now = time.monotonic()
        rate = (self.count - self.initial) / max(now - self._start, 1e-9)
        line = f"{self.description} {self.count}"
        if self.total:
            line += f"/{self.total} ({100 * self.count / self.total:.0f}%)"
        line += f" {rate:.3g} {self.unit}/s"
        line += "".join(f" {name} {value:.4g}" for name, value in self._values)
        print(line.strip(), file=self.file or sys.stderr, flush=True)
        self._last, self._printed_count = now, self.count

    def close(self):
        if not self._closed and self._printed_count != self.count:
            self._write()
        self._closed = True

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def bar(iterable=None, total=None, initial=0, description="", unit="it", show=True, file=None):
    """A tqdm bar when `file` (default stderr) is a terminal, else `LineProgress`; nothing
    is shown when `show` is False."""
    file = file or sys.stderr
    if is_terminal(file):
        import tqdm

        return tqdm.tqdm(iterable, total=total, initial=initial, desc=description, unit=unit, file=file,
                         disable=not show, dynamic_ncols=True)
    return LineProgress(iterable, total=total, initial=initial, description=description, unit=unit, file=file,
                        show=show)


class _StepLines(LineProgress):
    """`keras.utils.Progbar.update(current, values)` as plain lines."""

    def update(self, current, values=None):  # noqa: D102 (Progbar's signature)
        self.update_to(current, values or ())
        if self.total and current >= self.total:
            self.close()


def step_bar(target, show=True, stateful_metrics=None):
    """The trainer's progress: keras' Progbar when stdout is a terminal (where Progbar
    writes), else plain lines on stderr `step 1200/20000 (6%) 3.1 step/s loss 0.12 ...`."""
    if is_terminal(sys.stdout):
        import keras

        return keras.utils.Progbar(target, verbose=1 if show else 0, stateful_metrics=stateful_metrics)
    return _StepLines(total=target, description="step", unit="step", show=show)
