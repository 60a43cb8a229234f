"""A self-contained HTML report: every figure embedded as a base64 PNG, inline CSS, no external request."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from lopt.io.checkpoint import atomic_write_bytes

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #d62728; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: right; }
th { background: #f4f4f4; }
td:first-child, th:first-child { text-align: left; }
figure { display: inline-block; margin: .5em; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #555; max-width: 520px; }
.note { background: #f8f8f8; border-left: 4px solid #1f77b4; padding: .5em 1em; }
code { background: #f3f3f3; padding: 0 .2em; }
"""


@dataclass
class Section:
  """A report section: a title, paragraphs of HTML, and figures as (png bytes, caption)."""
  title: str
  paragraphs: list[str] = field(default_factory=list)
  figures: list[tuple[bytes, str]] = field(default_factory=list)


def escape(text) -> str:
  return html.escape(str(text))


def table(headers: list[str], rows: list[list]) -> str:
  """An HTML table; cells are escaped."""
  head = "".join(f"<th>{escape(h)}</th>" for h in headers)
  body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
  return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(title: str, sections: list[Section], subtitle: str = "") -> str:
  parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>",
           f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>"]
  if subtitle:
    parts.append(f"<p class='note'>{subtitle}</p>")
  for section in sections:
    parts.append(f"<h2>{escape(section.title)}</h2>")
    parts.extend(f"<p>{p}</p>" if not p.lstrip().startswith("<") else p for p in section.paragraphs)
    for png, caption in section.figures:
      data = base64.b64encode(png).decode()
      parts.append(f"<figure><img alt='{escape(caption)}' src='data:image/png;base64,{data}'>"
                   f"<figcaption>{escape(caption)}</figcaption></figure>")
  parts.append("</body></html>")
  return "\n".join(parts)


def write(path: str | Path, title: str, sections: list[Section], subtitle: str = "") -> Path:
  path = Path(path)
  atomic_write_bytes(path, render(title, sections, subtitle).encode())
  return path
