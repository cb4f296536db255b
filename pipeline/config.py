"""The build configuration: one frozen, validated dataclass, saved as OUT/config.json.

What decides the bytes of the dataset (seed, count, resolution, shard size, edit and defect
settings, judge and thresholds) is the build's identity: resuming into an OUT whose saved config
differs is refused. How the build runs (workers, Ray address) is not part of it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

MAX_SUB_EDITS = 8


class ConfigError(ValueError):
    """A bad build parameter: the CLI prints it as one line and exits 2."""


@dataclass(frozen=True)
class BuildConfig:
    count: int
    seed: int = 0
    resolution: int = 512
    shard_size: int = 64
    defect_rate: float = 0.25
    min_edits: int = 2
    max_edits: int = 5
    judge: str = "pixel"
    judge_options: dict[str, Any] = field(default_factory=dict)  # e.g. url/model for "vllm"
    routing: dict[str, float] = field(default_factory=dict)  # RoutingPolicy overrides

    def __post_init__(self) -> None:
        if not isinstance(self.count, int) or self.count < 1:
            raise ConfigError(f"count must be a positive integer, got {self.count!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            # int64 in the manifest; CIE-Bench relies on builds never reaching 2**63
            raise ConfigError(f"seed must be an integer within 0..2**63-1, got {self.seed!r}")
        if self.resolution < 64 or self.resolution > 4096:
            raise ConfigError(f"resolution must be within 64..4096 px, got {self.resolution}")
        if self.shard_size < 1:
            raise ConfigError(f"shard size must be at least 1, got {self.shard_size}")
        if not 0.0 <= self.defect_rate <= 1.0:
            raise ConfigError(f"defect rate must be within 0..1, got {self.defect_rate}")
        if not 1 <= self.min_edits <= self.max_edits <= MAX_SUB_EDITS:
            raise ConfigError(
                f"need 1 <= min edits <= max edits <= {MAX_SUB_EDITS}, "
                f"got {self.min_edits}..{self.max_edits}"
            )

    @property
    def num_units(self) -> int:
        return math.ceil(self.count / self.shard_size)

    def unit_indices(self, unit: int) -> range:
        """Sample indices of work unit `unit` (the unit of work, retry and resume)."""
        start = unit * self.shard_size
        return range(start, min(self.count, start + self.shard_size))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BuildConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown build parameters: {sorted(unknown)}")
        return cls(**data)

    # The judge's secrets never reach config.json: they come from the environment.
    def public_dict(self) -> dict[str, Any]:
        data = self.to_dict()
        data["judge_options"] = {
            k: v for k, v in self.judge_options.items() if "key" not in k and "token" not in k
        }
        return data


def save_config(out: Path, config: BuildConfig) -> None:
    """Write OUT/config.json, or check it matches the one a previous run left there."""
    path = out / "config.json"
    wanted = config.public_dict()
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != wanted:
            changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            raise ConfigError(
                f"{out} already holds a build with different parameters ({', '.join(changed)}); "
                "resume it with the same parameters or choose another --out"
            )
        return
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(wanted, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
