"""CIE-Bench split: layout, exact references, balance, determinism, disjointness from builds, CLI."""

from __future__ import annotations

import json
import re
import sys
import zlib
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from pipeline.ciebench import cases as ciebench
from trainer import evaluate
from pipeline.ciebench.cases import (
    BENCH_SEED,
    BenchConfig,
    BenchError,
    build_bench,
    read_bench,
    read_case,
    read_index,
)
from pipeline.record import EDIT_TYPES, MANIFEST_SCHEMA, sample_id
from pipeline.sources.scene import Scene, render
from pipeline.sources.procedural import ProceduralSource

RESOLUTION = 96
COUNT = 70  # 10 cases per sub-edit count 2..8
STAGE_SALTS = ("source", "compose", "edit", "defects", "judge")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    index = build_bench(out, BenchConfig(count=COUNT, resolution=RESOLUTION))
    return out, index


@pytest.fixture(scope="module")
def cases(bench):
    return read_bench(bench[0])


def test_layout_one_dir_per_case(bench, cases):
    out, index = bench
    assert len(index["cases"]) == COUNT == len(cases)
    for entry, case in zip(index["cases"], cases):
        files = sorted(p.name for p in (out / "cases" / entry["case_id"]).iterdir())
        n = entry["num_sub_edits"]
        assert files == sorted(["case.json", "source.png", "target.png", "edit_mask.png"]
                               + [f"mask_{i}.png" for i in range(n)])
        meta = json.loads((out / "cases" / entry["case_id"] / "case.json").read_text())
        assert meta["id"] == entry["case_id"] == case.id
        assert meta["bench"]["namespace_seed"] == BENCH_SEED
        assert [e["type"] for e in meta["sub_edits"]] == entry["edit_types"]
        assert case.source.shape == case.target.shape == (RESOLUTION, RESOLUTION, 3)


def test_reference_targets_are_exact_and_regions_cover_every_change(cases):
    for case in cases:
        # The reference is the render of the intended final scene: no injected defect.
        expected, _ = render(Scene.from_dict(case.private["target_scene"]))
        assert np.array_equal(case.target, expected), case.id
        union = np.logical_or.reduce([e.mask for e in case.sub_edits])
        assert np.array_equal(union, ~case.background_mask)
        changed = (case.source != case.target).any(axis=2)
        assert not (changed & case.background_mask).any(), f"{case.id} changes its background"
        assert all(e.mask.any() and e.box is not None for e in case.sub_edits)
        assert case.instruction and all(e.text for e in case.sub_edits)


def test_balanced_over_sub_edit_counts_and_edit_types(bench, cases):
    _, index = bench
    counts = Counter(len(c.sub_edits) for c in cases)
    assert counts == {n: COUNT // 7 for n in range(2, 9)}
    types = Counter(e.type for c in cases for e in c.sub_edits)
    assert set(types) == set(EDIT_TYPES)
    assert max(types.values()) - min(types.values()) <= 3, types
    assert index["edit_types"] == dict(sorted(types.items()))
    assert index["sub_edit_counts"] == {str(n): COUNT // 7 for n in range(2, 9)}


def test_uneven_count_gives_the_remainder_to_the_smallest_counts():
    assert BenchConfig(count=16).cases_per_count() == {2: 3, 3: 3, 4: 2, 5: 2, 6: 2, 7: 2, 8: 2}


def test_same_parameters_same_bytes(bench, tmp_path):
    again = tmp_path / "again"
    build_bench(again, BenchConfig(count=COUNT, resolution=RESOLUTION))
    first = bench[0]
    assert (again / "bench.json").read_text() == (first / "bench.json").read_text()
    for cid in ("cie-0000", "cie-0033", f"cie-{COUNT - 1:04d}"):
        for path in sorted((first / "cases" / cid).iterdir()):
            assert (again / "cases" / cid / path.name).read_bytes() == path.read_bytes()


# ---- disjoint from training builds ----------------------------------------------------------------

def entropy_words(values: list[int]) -> list[int]:
    """numpy's SeedSequence entropy words of a list of non-negative ints (each split into
    little-endian 32-bit words); checked against numpy below."""
    words = []
    for value in values:
        if value == 0:
            words.append(0)
        while value:
            words.append(value & 0xFFFFFFFF)
            value >>= 32
    return words


def test_entropy_words_match_numpy():
    for values in ([0, 5, 7], [2**40 + 3, 9, 1], [BENCH_SEED, 2_000_017, zlib.crc32(b"compose")]):
        a = np.random.SeedSequence(values).generate_state(8)
        b = np.random.SeedSequence(entropy_words(values)).generate_state(8)
        assert np.array_equal(a, b)


def test_build_seeds_and_indices_cannot_reach_the_bench_namespace():
    # A build's seed and index live in int64 manifest columns: the bench seed cannot be written.
    for column in ("seed", "index"):
        assert MANIFEST_SCHEMA.field(column).type == pa.int64()
    with pytest.raises((OverflowError, pa.ArrowInvalid)):
        pa.array([BENCH_SEED], pa.int64())
    # Every build entropy (seed, index < 2**63) has word 1 < 2**31, or fewer than 5 words;
    # every bench entropy has 5 words and word 1 == 2**31.
    edge = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 2**31, 2**62, 2**63 - 1]
    for salt in STAGE_SALTS:
        crc = zlib.crc32(salt.encode())
        for seed in edge:
            for index in edge:
                words = entropy_words([seed, index, crc])
                assert len(words) < 5 or words[1] < 2**31, (seed, index)
        for index in (2 * ciebench.INDEX_STRIDE, 8 * ciebench.INDEX_STRIDE + 10_000):
            words = entropy_words([BENCH_SEED, index, crc])
            assert len(words) == 5 and words[1] == 2**31


def test_bench_streams_ids_and_images_differ_from_builds_with_many_seeds(cases):
    bench_states = {
        tuple(np.random.SeedSequence([case.seed, case.index, zlib.crc32(s.encode())]).generate_state(4))
        for case in cases for s in STAGE_SALTS
    }
    bench_ids = {case.id for case in cases}
    bench_sources = {case.source.tobytes() for case in cases}
    assert all(case.seed == BENCH_SEED for case in cases)
    assert all(re.fullmatch(r"cie-\d{4}", cid) for cid in bench_ids)
    source = ProceduralSource(resolution=RESOLUTION)
    for seed in range(0, 400, 5):
        for index in range(12):
            assert sample_id(seed, index) not in bench_ids
            assert not re.fullmatch(r"cie-\d{4}", sample_id(seed, index))
            for s in STAGE_SALTS:
                state = np.random.SeedSequence([seed, index, zlib.crc32(s.encode())]).generate_state(4)
                assert tuple(state) not in bench_states
            if index < 3:
                assert source.make(seed, index).source.tobytes() not in bench_sources


# ---- reading errors ---------------------------------------------------------------------------------

def test_missing_or_corrupt_bench_is_a_clear_error(tmp_path, bench):
    with pytest.raises(BenchError, match="not a benchmark"):
        read_index(tmp_path)
    (tmp_path / "bench.json").write_text("{not json")
    with pytest.raises(BenchError, match="cannot read"):
        read_index(tmp_path)
    with pytest.raises(BenchError, match="cannot read case"):
        read_case(bench[0], "cie-9999")


def test_build_refuses_a_non_empty_directory_that_is_not_a_bench(tmp_path):
    (tmp_path / "cases").mkdir()
    (tmp_path / "cases" / "precious.txt").write_text("keep me")
    with pytest.raises(BenchError, match="not empty"):
        build_bench(tmp_path, BenchConfig(count=1, resolution=RESOLUTION))
    assert (tmp_path / "cases" / "precious.txt").read_text() == "keep me"


def test_rebuild_replaces_a_bench(tmp_path):
    build_bench(tmp_path, BenchConfig(count=8, resolution=RESOLUTION))
    build_bench(tmp_path, BenchConfig(count=3, resolution=RESOLUTION))
    assert sorted(p.name for p in (tmp_path / "cases").iterdir()) == ["cie-0000", "cie-0001", "cie-0002"]
    assert len(read_index(tmp_path)["cases"]) == 3


def test_bad_config_is_refused():
    with pytest.raises(BenchError):
        BenchConfig(count=0)
    with pytest.raises(BenchError):
        BenchConfig(resolution=32)


# ---- CLI ------------------------------------------------------------------------------------------

def _run(argv: list[str]) -> int:
    from flows.cli import Parser, UsageError

    parser = Parser(prog="mcie")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    ciebench.register(commands)
    evaluate.register(commands)  # `mcie eval` runs checkpoints: it lives with the trainer
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)  # as `mcie` does
        return 2
    return args.func(args)


def test_cli_builds_and_refuses_bad_arguments(tmp_path, capsys):
    assert _run(["bench", "build", "--out", str(tmp_path / "b"), "--count", "7",
                 "--resolution", "96"]) == 0
    assert len(read_index(tmp_path / "b")["cases"]) == 7
    assert "7 cases" in capsys.readouterr().out
    assert _run(["bench", "build", "--out", str(tmp_path / "c"), "--count", "0"]) == 2
    assert "--count" in capsys.readouterr().err
    assert _run(["bench", "build", "--out", str(tmp_path / "c"), "--resolution", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "resolution must be within 64..4096" in err
    assert _run(["eval", "--bench", str(tmp_path / "nope"), "--predictions", str(tmp_path)]) == 2
    assert "not a benchmark" in capsys.readouterr().err
    assert _run(["eval", "--bench", str(tmp_path / "b")]) == 2  # neither --predictions nor --checkpoint
