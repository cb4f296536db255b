"""What a build still has to do, read from OUT alone (no Prefect, no Ray: the CLI asks this before
paying for their start-up). The unit's manifest part is its completion marker; a build is complete
once every unit has one and the merge (manifest, defect log) and the report were made from the
parts as they are (stats.json records their digest).

OUT may be a local folder or an object-store URL (`pipeline.storage.location`): nothing here
renames or makes folders on a bucket (a prefix exists once an object is under it).
"""

from __future__ import annotations

from typing import Any, Callable

import pyarrow as pa

from pipeline.config import BuildConfig, save_config
from pipeline.dataset.output import DEFECTS, MANIFEST, unit_done
from pipeline.dataset.report import REPORT
from pipeline.dataset.source_index import (SOURCE_INDEX, KeyIndex, make_index, read_index,
                                           write_index)
from pipeline.storage import is_local, location

# config → (the key index, its table to save or None): how the first run fingerprints the source
IndexMaker = Callable[[BuildConfig], "tuple[KeyIndex, pa.Table | None]"]


def index_here(config: BuildConfig) -> tuple[KeyIndex, pa.Table | None]:
    """The index made in this process (threads): the default, and the CLI's pre-check."""
    from pipeline.unit import make_source

    return make_index(make_source(config))


def prepare_build(out: Any, config: BuildConfig, index_maker: IndexMaker | None = None) -> int:
    """Save (or check) OUT/config.json and fix the source's key list (on the first run: list and
    fingerprint the source with `index_maker`, in this process by default; `flows.index` makes it
    on Ray workers); returns the number of samples of the build. ConfigError for parameters that
    do not fit the source or OUT, before anything is written."""
    out = location(out)
    if (out / "config.json").is_file():
        save_config(out, config)  # a resume: the saved parameters must match
    if not (out / SOURCE_INDEX).is_file():  # first run (or a kill before the index was saved)
        index, table = (index_maker or index_here)(config)
        config.total_samples(index.size)  # a count the source cannot give: refused here
        if is_local(out):
            out.mkdir(parents=True, exist_ok=True)
        if table is not None:
            write_index(out, table)
    save_config(out, config)
    return total_samples(out, config)


def total_samples(out: Any, config: BuildConfig) -> int:
    return config.total_samples(read_index(location(out)).size)


def pending_units(out: Any, config: BuildConfig) -> list[int]:
    out = location(out)
    units = config.num_units(total_samples(out, config))
    return [u for u in range(units) if not unit_done(out, u)]


def is_complete(out: Any, config: BuildConfig) -> bool:
    """Every unit done, and manifest, defect log and report written after the last unit part
    (a kill during the merge leaves the build incomplete, so the next run merges again)."""
    out = location(out)
    if pending_units(out, config):
        return False
    finals = [out / MANIFEST, out / DEFECTS, out / REPORT]
    if not all(path.is_file() for path in finals):
        return False
    # stats.json, written with the report after the merge, names the parts it was made from:
    # completion is a fact of the bytes, not of file times (a `cp -r` copy stays complete)
    from pipeline.dataset.card import parts_digest, recorded_parts_digest

    return recorded_parts_digest(out) == parts_digest(out)
