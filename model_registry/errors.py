"""Error types of the model registry: every problem names the file and the key it is about."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# At most this many problems are spelled out in an exception message; the rest are counted.
_MAX_LISTED_PROBLEMS = 25


@dataclass(frozen=True)
class Problem:
    """One thing wrong with (or different in) a checkpoint.

    `file` is the file the problem is about (config.json, a weight shard, the index, ...), `key` the
    config key or weight name, `severity` either "error" (the checkpoint cannot be served) or
    "deviation" (servable, but differs from the released checkpoint it claims to be).
    """

    file: str
    key: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"{self.file}: {self.key!r}: {self.message}"


class CheckpointError(ValueError):
    """A checkpoint directory is malformed; `problems` lists every problem found."""

    def __init__(self, checkpoint: str | Path, problems: Iterable[Problem]):
        self.checkpoint = str(checkpoint)
        self.problems = list(problems)
        listed = "\n".join(f"  {problem}" for problem in self.problems[:_MAX_LISTED_PROBLEMS])
        more = len(self.problems) - _MAX_LISTED_PROBLEMS
        if more > 0:
            listed += f"\n  ... and {more} more"
        super().__init__(
            f"malformed p-MoD checkpoint {self.checkpoint} ({len(self.problems)} problem(s)):\n{listed}"
        )


class ConfigError(CheckpointError):
    """A checkpoint's config.json cannot be served (missing, mistyped or unsupported keys)."""
