"""Progress display for long work: a bar with ETA and the current loss (rich), quiet when not on a terminal."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def training_bar(total: int, description: str = "meta-training", start: int = 0):
  """Yields ``update(step, total, record)``; shows meta-loss, held-out loss and divergence counts.

  On a terminal it is a live bar; otherwise (CI, pipes) it prints one line about every 10% of the way.
  """
  console = Console(stderr=True)
  if not console.is_terminal:
    started, last = time.perf_counter(), [start]

    def update(step, total_steps, record):
      if step - last[0] >= max(1, total_steps // 10) or step == total_steps:
        last[0] = step
        elapsed = time.perf_counter() - started
        eta = elapsed / max(step - start, 1) * (total_steps - step)
        print(f"{description}: step {step}/{total_steps}  meta-loss {record['meta_loss']:.4g}  "
              f"held-out {record.get('best_held_out_loss', float('nan')):.4g}  diverged {record['diverged_problems']}"
              f"  dropped {record['dropped_problems']}  skipped {record['total_skipped_steps']}  eta {eta:.0f}s", file=sys.stderr, flush=True)
    yield update
    return
  columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
             TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
  with Progress(*columns, console=console) as bar:
    task = bar.add_task(description, total=total, completed=start, status="")

    def update(step, total_steps, record):
      status = (f"meta-loss {record['meta_loss']:.4g}  held-out {record.get('best_held_out_loss', float('nan')):.4g}"
                f"  diverged {record['diverged_problems']}  dropped {record['dropped_problems']}"
                f"  skipped {record['total_skipped_steps']}")
      bar.update(task, completed=step, status=status)
    yield update


def say(message: str) -> None:
  """A one-line status message on stderr."""
  Console(stderr=True).print(f"[bold]lopt[/bold] {message}", highlight=False)
