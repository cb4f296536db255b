"""What a build still has to do, read from OUT alone (no Prefect, no Ray: the CLI asks this before
paying for their start-up). The unit's manifest part is its completion marker; a build is complete
once every unit has one and the merge (manifest, defect log) and the report were written after it.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import BuildConfig
from pipeline.dataset.output import DEFECTS, MANIFEST, part_path, unit_done
from pipeline.dataset.report import REPORT


def pending_units(out: Path, config: BuildConfig) -> list[int]:
    return [u for u in range(config.num_units) if not unit_done(Path(out), u)]


def is_complete(out: Path, config: BuildConfig) -> bool:
    """Every unit done, and manifest, defect log and report written after the last unit part
    (a kill during the merge leaves the build incomplete, so the next run merges again)."""
    out = Path(out)
    if pending_units(out, config):
        return False
    finals = [out / MANIFEST, out / DEFECTS, out / REPORT]
    if not all(path.is_file() for path in finals):
        return False
    newest_part = max(part_path(out, u).stat().st_mtime_ns for u in range(config.num_units))
    return min(path.stat().st_mtime_ns for path in finals) >= newest_part
