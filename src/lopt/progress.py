"""Progress display for long work: a bar with ETA and a status (the current loss), quiet when not on a terminal."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def work_bar(total: int, description: str, start: int = 0, lines: int = 10, unit: str = ""):
  """Yields ``update(completed, status)``: ``completed`` units of ``total`` done, ``status`` a short text.

  On a terminal it is a live bar with ETA; otherwise (CI, pipes) it prints one line about every 1/``lines`` of the
  way (and at the end): "description: [unit ]completed/total  status  eta Ns".
  """
  console = Console(stderr=True)
  if not console.is_terminal:
    started, last = time.perf_counter(), [start]

    def update(completed, status):
      if completed - last[0] >= max(1, total / lines) or completed >= total:
        last[0] = completed
        eta = (time.perf_counter() - started) / max(completed - start, 1) * (total - completed)
        print(f"{description}: {unit + ' ' if unit else ''}{completed}/{total}  {status}  eta {eta:.0f}s", file=sys.stderr, flush=True)
    yield update
    return
  columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
             TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
  with Progress(*columns, console=console) as bar:
    task = bar.add_task(description, total=max(total, 1), completed=start, status="")
    yield lambda completed, status: bar.update(task, completed=completed, status=status)


@contextmanager
def training_bar(total: int, description: str = "meta-training", start: int = 0):
  """Yields ``update(step, total, record)`` for meta-training: shows the meta-loss, the best held-out loss and the
  divergence counts of ``record`` (a metrics.jsonl record)."""
  with work_bar(total, description, start, unit="step") as show:
    def update(step, total_steps, record):
      show(step, f"meta-loss {record['meta_loss']:.4g}  held-out {record.get('best_held_out_loss', float('nan')):.4g}"
                 f"  diverged {record['diverged_problems']}  dropped {record['dropped_problems']}"
                 f"  skipped {record['total_skipped_steps']}")
    yield update


def say(message: str) -> None:
  """A one-line status message on stderr."""
  Console(stderr=True).print(f"[bold]lopt[/bold] {message}", highlight=False)
