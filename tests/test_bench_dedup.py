"""bench/dedup.py: one line per size with the decision's figures, skewed by a real index's
pHashes when given one; a missing index is a usage error."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench_scripts import load_bench

dedup_bench = load_bench("dedup")


def test_one_line_per_size_and_the_index_s_low_bands_crowd_the_hashes(tmp_path, capsys):
    index = tmp_path / "source_index.parquet"
    pq.write_table(pa.table({"phash": [0x1111_2222_3333_4444, None, 0x5555_6666_7777_8888]}), index)
    assert dedup_bench.main(["--sizes", "500", "2000"]) == 0
    assert dedup_bench.main(["--sizes", "2000", "--index", str(index)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["entries"], line["hashes"]) for line in lines] == [
        (500, "uniform"), (2000, "uniform"), (2000, "index skew")]
    assert lines[1]["duplicates"] == 0  # uniform random 64-bit hashes: none within 6 bits
    # two low halves only: every hash shares its lower 32 bits with about 1000 others, so some
    # pairs of random upper halves fall within 6 bits (about 2.6e-4 of 1e6 pairs)
    assert 100 < lines[2]["duplicates"] < 500
    rng = dedup_bench.np.random.default_rng(0)
    low = {int(h) & 0xFFFF_FFFF for h in dedup_bench.hashes(100, dedup_bench.index_low_halves(index), rng)}
    assert low == {0x3333_4444, 0x7777_8888}


def test_a_missing_index_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        dedup_bench.main(["--index", str(tmp_path / "none.parquet")])
    assert exited.value.code == 2
    assert "no such file" in capsys.readouterr().err
