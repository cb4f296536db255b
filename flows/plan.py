"""What a build still has to do, read from OUT alone (no Prefect, no Ray: the CLI asks this before
paying for their start-up). The unit's manifest part is its completion marker; a build is complete
once every unit has one and the merge (manifest, defect log) and the report were made from the
parts as they are (stats.json records their digest).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import BuildConfig, save_config
from pipeline.dataset.output import DEFECTS, MANIFEST, unit_done
from pipeline.dataset.report import REPORT
from pipeline.dataset.source_index import SOURCE_INDEX, make_index, read_index, write_index


def prepare_build(out: Path, config: BuildConfig) -> int:
    """Save (or check) OUT/config.json and fix the source's key list (on the first run: list and
    fingerprint the source); returns the number of samples of the build. ConfigError for
    parameters that do not fit the source or OUT, before anything is written."""
    from pipeline.unit import make_source

    out = Path(out)
    if (out / "config.json").is_file():
        save_config(out, config)  # a resume: the saved parameters must match
    if not (out / SOURCE_INDEX).is_file():  # first run (or a kill before the index was saved)
        index, table = make_index(make_source(config))
        config.total_samples(index.size)  # a count the source cannot give: refused here
        out.mkdir(parents=True, exist_ok=True)
        if table is not None:
            write_index(out, table)
    save_config(out, config)
    return total_samples(out, config)


def total_samples(out: Path, config: BuildConfig) -> int:
    return config.total_samples(read_index(Path(out)).size)


def pending_units(out: Path, config: BuildConfig) -> list[int]:
    units = config.num_units(total_samples(out, config))
    return [u for u in range(units) if not unit_done(Path(out), u)]


def is_complete(out: Path, config: BuildConfig) -> bool:
    """Every unit done, and manifest, defect log and report written after the last unit part
    (a kill during the merge leaves the build incomplete, so the next run merges again)."""
    out = Path(out)
    if pending_units(out, config):
        return False
    finals = [out / MANIFEST, out / DEFECTS, out / REPORT]
    if not all(path.is_file() for path in finals):
        return False
    # stats.json, written with the report after the merge, names the parts it was made from:
    # completion is a fact of the bytes, not of file times (a `cp -r` copy stays complete)
    from pipeline.dataset.card import parts_digest, recorded_parts_digest

    return recorded_parts_digest(out) == parts_digest(out)
