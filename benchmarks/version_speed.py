"""A whole `lopt` command, this checkout against an earlier commit, side by side: wall time, A/B ratio, and whether
the two printed the same result lines.

  python benchmarks/version_speed.py --ref a47849a --runs 2 -- demo      # lopt demo: today vs lopt 0.1

Each run starts a fresh process on a fresh output directory (the command's `--out` is added), alternating A B A B so
drifts of a shared machine's speed hit both alike; the earlier commit runs from a `git archive` of its src/ with the
same interpreter and packages. The last line is JSON. Results: benchmarks/results/version_speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT_LINE_PREFIXES = ("learned ", "momentum ", "adam ", "rmsprop ", "sgd ")  # the comparison table's rows


def source_of(ref: str, workdir: Path) -> Path:
  """src/ of commit ``ref``, unpacked under ``workdir``."""
  archive = workdir / "src.tar"
  subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), ref, "src"], check=True)
  with tarfile.open(archive) as tar:
    tar.extractall(workdir / ref, filter="data")
  return workdir / ref / "src"


def run_once(source: Path, command: list[str], out: Path) -> tuple[float, list[str]]:
  env = dict(os.environ, PYTHONPATH=str(source))
  started = time.perf_counter()
  done = subprocess.run([sys.executable, "-c", "import sys; from lopt.cli import main; sys.exit(main())", *command,
                         "--out", str(out)], env=env, capture_output=True, text=True)
  seconds = time.perf_counter() - started
  if done.returncode != 0:
    raise SystemExit(f"{source}: {' '.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}")
  lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.startswith(RESULT_LINE_PREFIXES)]
  return seconds, lines


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ref", required=True, help="the earlier commit (B)")
  parser.add_argument("--runs", type=int, default=2, help="runs of each, alternating")
  parser.add_argument("command", nargs="+", help="the lopt command and its options, without --out")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    workdir = Path(tmp)
    sources = {"A (this checkout)": ROOT / "src", f"B ({args.ref})": source_of(args.ref, workdir)}
    times = {name: [] for name in sources}
    outputs = {}
    for i in range(args.runs):
      for j, (name, source) in enumerate(sources.items()):
        seconds, lines = run_once(source, args.command, workdir / f"out-{j}-{i}")
        times[name].append(seconds)
        outputs[name] = lines
        print(f"{name}: run {i + 1}: {seconds:.1f} s", flush=True)
  a, b = times.values()
  ratios = [x / y for x, y in zip(a, b)]
  same = outputs[list(sources)[0]] == outputs[list(sources)[1]]
  print(f"median wall: A {statistics.median(a):.1f} s, B {statistics.median(b):.1f} s; A/B per pair "
        f"{', '.join(f'{r:.3f}' for r in ratios)}; same result lines: {same}")
  print(json.dumps({"command": args.command, "ref": args.ref, "a_seconds": a, "b_seconds": b, "ratios": ratios,
                    "median_ratio": statistics.median(ratios), "same_result_lines": same,
                    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                    "date": time.strftime("%Y-%m-%d")}))


if __name__ == "__main__":
  main()
