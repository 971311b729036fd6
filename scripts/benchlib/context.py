"""What every topic gets: the options, the shared Bench, the run directory, and notes."""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .cpu import FOREIGN_WARN_PCT, foreign_warning
from .measure import Bench
from .procs import progress
from .report import fmt_value
from .targets import Fresh, target_factory


@dataclass
class Context:
    args: argparse.Namespace
    bench: Bench
    run_dir: Path
    #: nbdkit threads per connection for every server a topic does not vary them for
    threads: int
    #: delete each backing file after use (the disk is too small to keep them all)
    delete_after: bool
    stamp: str
    measured: int = 0
    #: (tag, foreign CPU %) of the measurements other work disturbed
    disturbed: list[tuple[str, float]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.bench.size

    def fresh(self, target: str, threads: int | None = None) -> Fresh:
        return target_factory(target, self.run_dir, self.size,
                              threads=self.threads if threads is None else threads,
                              delete_after=self.delete_after)

    def show(self, tag: str, r: dict, unit: str) -> None:
        """One measurement's result line, with a warning when other work disturbed it."""
        warning = foreign_warning(r)
        progress(f"{tag}:   {fmt_value(r['value'], unit)} {unit}"
                 + (f"  (warning: {warning})" if warning else ""))
        self.measured += 1
        if warning:
            self.disturbed.append((tag, r["foreign_cpu_pct"]))

    def disturbance_note(self) -> str | None:
        """One line on how many measurements other processes disturbed, if any."""
        if not self.disturbed:
            return None
        tag, worst = max(self.disturbed, key=lambda d: d[1])
        pcts = [p for _, p in self.disturbed]
        return (f"{len(pcts)} of {self.measured} measurements ran while other processes used "
                f"more than {FOREIGN_WARN_PCT:g}% of a CPU (median {statistics.median(pcts):g}%, "
                f"worst {worst:g}% during {tag}): those numbers are suspect; per run in the "
                "JSON as foreign_cpu_pct")
