"""What the sink counted: rows by table, node and error type.

Apart from the sink (camjobs.pipeline.sink), which is Ray's Datasink, so that a run with nothing
to write counts without importing Ray.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class SinkStats:
    processed: int = 0
    errors: int = 0
    skipped: int = 0  # hashed and found unchanged (an incremental run)
    refine_failed: int = 0  # cams rows whose refinement failed (their CAM columns are intact)
    rows_per_node: Counter = field(default_factory=Counter)
    error_types: Counter = field(default_factory=Counter)

    def add(self, other: SinkStats) -> None:
        self.processed += other.processed
        self.errors += other.errors
        self.skipped += other.skipped
        self.refine_failed += other.refine_failed
        self.rows_per_node.update(other.rows_per_node)
        self.error_types.update(other.error_types)
