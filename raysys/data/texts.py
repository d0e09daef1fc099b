"""Plain text for the unsupervised adaptation tasks (LLaRA, MNTP): a corpus
(BEIR ``corpus.jsonl``, JSONL or Parquet) read into one Arrow table, and the
(text, next text) pairs that LLaRA's EBAR predicts.

EBAR pairs come from each passage cut in two: the first part is the input,
the second the "next" text. The cut is the sentence boundary nearest the
middle word (a passage of one sentence is cut at its middle word), so both
parts are about the same passage and neither is empty unless the passage has
a single word (then EBAR has no target for it; such passages are counted).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from raysys.data.readers import DataError, Report, compact_corpus, read_corpus

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_halves(text: str) -> tuple[str, str]:
    """``text`` cut at the sentence boundary nearest its middle word (else at
    the middle word): ``(first part, second part)``."""
    words = text.split()
    if len(words) < 2:
        return text.strip(), ""
    middle = len(text) // 2
    # Character offsets where a sentence ends (followed by white space).
    cuts = [m.start() for m in _SENTENCE_END.finditer(text)]
    cuts = [c for c in cuts if text[:c].strip() and text[c:].strip()]
    if cuts:
        cut = min(cuts, key=lambda c: abs(c - middle))
        return text[:cut].strip(), text[cut:].strip()
    half = len(words) // 2
    return " ".join(words[:half]), " ".join(words[half:])


@dataclass
class TextSet:
    """Texts by row (title and text joined), with what reading skipped."""

    corpus: pa.Table
    report: Report = field(default_factory=Report)

    def __len__(self) -> int:
        return self.corpus.num_rows

    def texts(self, rows: list[int]) -> list[str]:
        taken = self.corpus.take(pa.array(rows, pa.int64()))
        titles = taken.column("title").to_pylist()
        bodies = taken.column("text").to_pylist()
        return [f"{ti} {tx}".strip() if ti else tx for ti, tx in zip(titles, bodies, strict=True)]


def load_texts(data: Any) -> TextSet:
    """The texts of ``data.corpus`` (else ``data.path``'s ``corpus.jsonl``),
    at most ``data.max_texts`` of them (0: all)."""
    src = data.corpus or data.path
    if not src:
        raise DataError("no text: set data.corpus (a corpus file) or data.path (a BEIR folder)")
    p = Path(src)
    p = p / "corpus.jsonl" if p.is_dir() else p
    report = Report()
    table = read_corpus(p, report, on_bad_line=data.on_bad_line)
    if data.max_texts > 0:
        table = table.slice(0, data.max_texts)
    if table.num_rows == 0:
        raise DataError(f"{p}: no usable texts")
    return TextSet(compact_corpus(table), report)
