"""bench/scale.py: its synthetic corpus, the OUT of N rows it makes from a build, its slopes, its
budget, and (slow) a whole run at a tiny size that prints every figure, slope and target."""

from __future__ import annotations

import json
import re
import tarfile

import pytest

from bench_scripts import load_bench
from shard_samples import clean_build  # noqa: F401 - a fixture

scale = load_bench("scale")


def test_the_corpus_is_img2dataset_shards_made_once_and_the_same_for_a_seed(tmp_path):
    from pipeline.sources.webdataset import WebDatasetSource

    corpus, made = scale.make_corpus(tmp_path / "a", 250, seed=3, per_shard=100)
    assert made == 250
    shards = sorted(p.name for p in corpus.glob("*.tar"))
    assert shards == ["00000.tar", "00001.tar", "00002.tar"]  # the last one partial
    with tarfile.open(corpus / "00002.tar") as tar:
        names = tar.getnames()
    assert names[:2] == ["000000200.jpg", "000000200.json"] and len(names) == 100
    source = WebDatasetSource(path=str(corpus), resolution=64)
    keys = source.keys()
    assert len(keys) == len(set(keys)) == 250 and keys[0] == "00000/000000000"
    item = source.read(keys[123])
    assert item.meta["caption"] == "synthetic image 000000123" and item.meta["license"] == "cc0-1.0"
    with tarfile.open(corpus / "00001.tar") as tar:
        sizes = [json.load(tar.extractfile(m))["width"] for m in tar if m.name.endswith(".json")]
    assert min(sizes) >= 64 and max(sizes) <= 128 and len(set(sizes)) > 10  # random sizes

    again, _ = scale.make_corpus(tmp_path / "b", 250, seed=3, per_shard=100)  # another cache
    for name in shards:
        assert (again / name).read_bytes() == (corpus / name).read_bytes()
    other, _ = scale.make_corpus(tmp_path / "c", 100, seed=4, per_shard=100)
    assert (other / "00000.tar").read_bytes() != (corpus / "00000.tar").read_bytes()

    # cached: a smaller corpus links the same shards; nothing is made again, even past the deadline
    before = (corpus / "00000.tar").stat().st_mtime_ns
    prefix, made = scale.make_corpus(tmp_path / "a", 200, seed=3, per_shard=100, deadline=0)
    assert made == 200 and (prefix / "00001.tar").stat().st_ino == (corpus / "00001.tar").stat().st_ino
    assert (corpus / "00000.tar").stat().st_mtime_ns == before
    # a budget already used: says how far it got
    _, made = scale.make_corpus(tmp_path / "a", 400, seed=3, per_shard=100, deadline=0)
    assert made == 200  # the two cached full shards, not the two it would have to make


def test_an_out_of_n_rows_replicated_from_a_build_verifies(clean_build, tmp_path):  # noqa: F811
    from pipeline.dataset.output import finalize, read_manifest
    from pipeline.dataset.verify import verify

    out = tmp_path / "big"
    assert scale.replicate_out(clean_build, out, rows=20, shard_size=8) == 20
    table = finalize(out)
    assert table.num_rows == 20
    rows = read_manifest(out).to_pylist()
    assert [r["index"] for r in rows] == list(range(20))
    assert len({r["id"] for r in rows}) == 20
    assert {r["shard"] for r in rows} >= {"train-000002.tar", "negatives-000000.tar"}
    assert verify(out) == []
    # past its deadline it stops between units and says how many rows it wrote
    assert scale.replicate_out(clean_build, tmp_path / "late", rows=20, shard_size=8, deadline=0) == 0


def test_slopes_extrapolate_only_from_two_measured_sizes():
    figures = scale.Figures()
    figures.put("t_s", 1000, 2.0)
    assert figures.slope("t_s") is None
    assert figures.predict("t_s", 10_000) == pytest.approx(20.0)  # one point: linear
    assert figures.budget_guess("t_s", 10_000) == pytest.approx(20.0)
    assert figures.budget_guess("u_s", 10_000) is None
    assert not figures.extrapolate("t_s", 10_000)
    figures.put("t_s", 10_000, 2.0 * 10 ** 1.5)  # t ∝ N^1.5
    b, _ = figures.slope("t_s")
    assert b == pytest.approx(1.5)
    assert figures.extrapolate("t_s", 100_000)
    assert figures.values["t_s"][100_000] == (pytest.approx(2.0 * 100 ** 1.5), "extrapolated")
    assert figures.measured("t_s") == {1000: 2.0, 10_000: pytest.approx(2.0 * 10 ** 1.5)}
    assert not figures.extrapolate("t_s", 10_000)  # a measured figure stays measured
    line = scale.size_line(figures, 100_000, ["index_s[1] (budget used)"])
    assert line == ("100k: measured nothing; extrapolated from slope: t_s (b = 1.50 over 1k, 10k); "
                    "not run: index_s[1] (budget used)")
    figures.put("list_s", 100_000, 1.0)
    figures.put("list_s", 1000, 0.01)
    line = scale.size_line(figures, 1_000_000, [])
    assert line == "1M: measured nothing; extrapolated from slope: t_s (b = 1.50 over 1k, 10k), list_s (b = 1.00 over 1k, 100k)"
    figures.put("flat_s", 1000, 10.0)  # a start-up that hides the per-key cost at small sizes
    figures.put("flat_s", 10_000, 11.0)
    assert figures.predict("flat_s", 100_000) == pytest.approx(12.1)
    assert figures.budget_guess("flat_s", 100_000) == pytest.approx(110.0)  # reserved: linear


def test_a_step_runs_in_its_own_process_and_is_stopped_at_its_budget(tmp_path):
    corpus, _ = scale.make_corpus(tmp_path, 150, seed=0, per_shard=100)
    env = scale.child_env(tmp_path)
    result = scale.run_step("listing", env, 120, corpus=corpus)
    assert result["keys"] == 150 and result["rss_mib"] > 20 and result["seconds"] > 0
    assert "stopped after" in scale.run_step("listing", env, 0.05, corpus=corpus)["stopped"]


def test_a_spent_budget_says_how_far_the_corpus_got(tmp_path, capsys):
    assert scale.main(["--sizes", "300", "100", "--only", "index", "--max-seconds", "0", "0.5",
                       "--per-shard", "100", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sizes 100, 300; workers [1, 2]; budget 0.5, 0 s;" in out  # one budget per size
    # the 100 made for the first size are cached; the rest would need a budget
    assert "300: measured nothing; not run: corpus (made 100 of 300 images in the budget" in out
    with pytest.raises(SystemExit) as exc:
        scale.main(["--sizes", "300", "100", "--max-seconds", "1", "2", "3"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_a_tiny_run_prints_every_figure_its_slopes_and_the_targets(tmp_path, capsys):
    """The whole bench at 100 and 200 keys (shards of 50, units of 16), 1 and 2 workers: about
    two minutes on two idle cores (Ray starts for each indexing, five builds)."""
    assert scale.main(["--sizes", "100", "200", "--workers", "1", "2", "--per-shard", "50",
                       "--shard-size", "16", "--max-seconds", "400", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    print(out)  # shown by pytest on a failure
    assert re.search(r"template: procedural build of 32 samples \(units of 16\) at 64 px, 2 workers: "
                     r"\d+\.\d\d pairs/s; a whole build of 200 at that rate: \d+\.\d h", out)
    assert re.search(r"indexing path: (flows\.index\.index_source on Ray|driver-side make_index)", out)
    labels = ["listing", "indexing, 1 worker", "indexing, 2 workers", "keys/s per worker core",
              "listing keys (driver)", "fingerprinting (workers)", "duplicates decided (driver)",
              "driver peak RSS", "first unit, webdataset build", "first unit, procedural build",
              "CLI peak RSS until then", "OUT of N rows made (bench set-up)", "manifest merge (finalize)", "verify",
              "report"]
    table = out[out.index("\nN "):out.index("slopes (")]
    for label in labels:
        row = next(line for line in table.splitlines() if line.strip().startswith(label))
        cells = [row[i:i + 12].strip() for i in range(34, len(row), 12)]  # the table's columns
        assert len(cells) == 2 and all(re.fullmatch(r"[\d.e+]+( s| MiB)?", c) for c in cells), row
    figures = ["listing_s", "index_s[1]", "index_s[2]", "index_rss_mib[2]", "first_unit_wds_s",
               "first_unit_proc_s", "driver_rss_wds_mib", "merge_s", "verify_s", "report_s"]
    for name in figures:
        assert re.search(rf"^  {re.escape(name)} +b = -?\d+\.\d\d over 100, 200", out, re.M), name
    assert re.search(r"index throughput 2 workers / 1 worker at 200: \d+\.\d\d \(target >= 1\.8: (PASS|FAIL)\)", out)
    assert re.search(r"of which the workers' fingerprinting: \d+\.\d\d \(\d+\.\d s -> \d+\.\d s\)", out)
    assert re.search(r"driver peak RSS \(indexing, 2 workers\) 200 / 100: \d+\.\d\d \(target <= 1\.2: (PASS|FAIL)\)", out)
    assert "not run" not in out
