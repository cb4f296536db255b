"""One work unit end to end without orchestration: a failure inside one sample's stage quarantines
that sample with its reason, and the unit (and the build) goes on."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.compose.procedural import Composer
from pipeline.config import BuildConfig
from pipeline.dataset.output import finalize, part_path
from pipeline.sources.procedural import ProceduralSource
from pipeline.unit import UnitPipeline
from pipeline.dataset.verify import verify

CONFIG = BuildConfig(count=6, shard_size=6, resolution=128, seed=3, defect_rate=0.3)


def run_unit(out: Path) -> dict[int, dict]:
    stats = UnitPipeline(CONFIG, out).run(0)
    assert stats.samples == 6
    finalize(out)
    assert verify(out) == []
    return {row["index"]: row for row in pq.read_table(part_path(out, 0)).to_pylist()}


def test_a_stage_raising_on_one_sample_quarantines_only_that_sample(tmp_path, monkeypatch):
    original = Composer.process

    def flaky(self, sample):
        if sample.index == 2:
            raise RuntimeError("composer exploded on purpose")
        original(self, sample)

    monkeypatch.setattr(Composer, "process", flaky)
    rows = run_unit(tmp_path)
    assert rows[2]["verdict"] == "error"
    assert rows[2]["error_stage"] == "compose"
    assert "composer exploded on purpose" in rows[2]["error"]
    assert rows[2]["shard"] == f"quarantine/{rows[2]['id']}.json"
    assert (tmp_path / "quarantine" / f"{rows[2]['id']}.source.png").is_file()  # nothing lost
    others = [rows[i]["verdict"] for i in (0, 1, 3, 4, 5)]
    assert all(v in ("accept", "reject", "borderline") for v in others)


def test_a_source_that_cannot_be_made_still_gets_its_manifest_row(tmp_path, monkeypatch):
    original = ProceduralSource.read

    def flaky(self, key):
        if key == "4":
            raise OSError("disk hiccup")
        return original(self, key)

    monkeypatch.setattr(ProceduralSource, "read", flaky)
    rows = run_unit(tmp_path)
    assert sorted(rows) == list(range(6))
    assert (rows[4]["verdict"], rows[4]["error_stage"]) == ("error", "source")
    assert "disk hiccup" in rows[4]["error"]


def test_the_same_unit_gives_the_same_rows(tmp_path):
    first = run_unit(tmp_path / "a")
    second = run_unit(tmp_path / "b")
    keys = ("id", "verdict", "checksum", "score_overall")
    assert [[r[k] for k in keys] for r in first.values()] == [[r[k] for k in keys] for r in second.values()]


@pytest.mark.parametrize("bad", [{"count": 0}, {"count": 5, "seed": -1}, {"count": 5, "seed": 2**63},
                                 {"count": 5, "min_edits": 3, "max_edits": 2},
                                 {"count": 5, "defect_rate": 1.5}, {"count": 5, "resolution": 32}])
def test_bad_build_parameters_are_refused_with_a_reason(bad):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError):
        BuildConfig(**bad)
