"""Judge quality on the real editor's fault injection, and the `judge-bench` subcommand."""

from __future__ import annotations

import argparse
import json

import pytest

from pipeline.compose.procedural import Composer
from pipeline.editors.defects import DEFECT_TYPES
from pipeline.editors.procedural import ProceduralEditor
from pipeline.judges.base import JudgeStage, make_judge
from pipeline.judges.bench import judge_bench, register
from pipeline.routing import RouteStage, RoutingPolicy
from pipeline.sources.procedural import ProceduralSource

FIXED_SET = range(8)  # sample indices of build seed 0
RESOLUTION = 256


def _pipeline(defect_rate: float, defect_types=DEFECT_TYPES):
    source = ProceduralSource(resolution=RESOLUTION)
    samples = [source.make(0, i) for i in FIXED_SET]
    for stage in (Composer(), ProceduralEditor(defect_rate, defect_types),
                  JudgeStage(make_judge("pixel")), RouteStage(RoutingPolicy())):
        samples = stage(samples)
    return samples


@pytest.mark.parametrize("defect_type", DEFECT_TYPES)
def test_every_injected_defect_type_is_caught_on_a_fixed_set(defect_type):
    samples = _pipeline(1.0, [defect_type])
    spoiled = [s for s in samples if s.defects]
    assert len(spoiled) >= 3, f"{defect_type} applied to too few of the fixed samples"
    for s in spoiled:
        assert s.defects[0]["type"] == defect_type
        assert s.verdict in ("reject", "borderline"), (s.index, s.defects, s.scores)
    # What applies should mostly be rejected outright, not left to a person.
    assert sum(s.verdict == "reject" for s in spoiled) >= len(spoiled) - 1


def test_clean_exact_pairs_are_accepted():
    samples = _pipeline(0.0)
    assert all(not s.failed for s in samples)
    for s in samples:
        assert s.verdict == "accept", (s.index, s.scores.get("sub_edit_reasons"))
        assert s.verdict_by == "judge" and all(s.scores["sub_edit_pass"])


def test_judge_bench_report():
    report = judge_bench(24, 0.5, seed=3, resolution=RESOLUTION)
    assert report["scored"] + sum(report["errors"].values()) == 24
    assert report["clean"] + report["defective"] == report["scored"]
    assert report["clean"] > 0 and report["defective"] > 0
    assert report["defect_recall"] >= 0.9
    assert report["false_reject_rate"] <= 0.1
    assert 0 <= report["borderline_rate"] <= 1
    by_type = report["per_defect_type"]
    assert set(by_type) <= set(DEFECT_TYPES)
    assert sum(v["count"] for v in by_type.values()) == report["defective"]
    for entry in report["per_edit_type"].values():
        assert set(entry) == {"clean", "defective"}
    assert report["judge_ms_per_pair"] > 0
    assert report["policy"] == RoutingPolicy().to_dict()
    json.dumps(report)  # plain JSON


def test_judge_bench_counts_misses_against_a_lax_policy():
    # A policy that accepts everything: recall falls to 0, nothing is rejected.
    lax = RoutingPolicy(sub_edit_pass=0.0, background_accept=0.0, background_reject=0.0,
                        overall_accept=0.0, overall_reject=0.0)
    report = judge_bench(12, 1.0, seed=1, resolution=RESOLUTION, policy=lax)
    assert report["defective"] > 0 and report["defect_recall"] == 0.0
    assert report["misses"] and report["misses"][0]["what"] == "defect accepted"


def test_judge_bench_refuses_bad_arguments():
    with pytest.raises(ValueError, match="count"):
        judge_bench(0, 0.5)
    with pytest.raises(ValueError, match="defect rate"):
        judge_bench(4, 1.5)
    with pytest.raises(ValueError, match="unknown judge"):
        judge_bench(1, 0.5, judge="nope")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcie")
    register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_prints_the_report(capsys):
    args = _parser().parse_args(["judge-bench", "--count", "6", "--defect-rate", "0.5",
                                 "--seed", "2", "--resolution", "128"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 6 and report["resolution"] == 128 and report["judge"] == "pixel"


@pytest.mark.parametrize(
    "argv",
    [["judge-bench", "--count", "0", "--defect-rate", "0.5"],
     ["judge-bench", "--count", "5", "--defect-rate", "2"],
     ["judge-bench", "--count", "5", "--defect-rate", "0.1", "--resolution", "10"],
     ["judge-bench", "--count", "x", "--defect-rate", "0.1"]],
)
def test_cli_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_cli_unknown_judge_is_a_one_line_error(capsys):
    args = _parser().parse_args(["judge-bench", "--count", "2", "--defect-rate", "0.5",
                                 "--judge", "nope"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown judge" in err


def test_cli_measures_the_judge_on_photos(tmp_path, capsys):
    # `mcie judge-bench` on a folder of real photos: the build's own front half (folder source,
    # classical grounder, inventory composer, photo editor with the defect rate).
    from flows.cli import main
    from photo_fixtures import photo_folder

    # two photos with things the classical grounder names even at 64 px
    folder = photo_folder(tmp_path / "photos", ["motorcycle_left", "rocket"])
    argv = ["judge-bench", "--source", "folder", "--source-path", str(folder), "--editor", "photo",
            "--defect-rate", "1.0", "--resolution", "64", "--edits-per-image", "3"]
    assert main([*argv, "--count", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 4 and report["source"] == "folder" and report["editor"] == "photo"
    assert report["grounder"] == "classical" and report["composer"] == "inventory"
    assert report["scored"] + sum(report["errors"].values()) == 4
    assert report["defective"] >= 1 and 0.0 <= report["defect_recall"] <= 1.0
    assert set(report["ms_per_pair"]) == {"read", "ground", "compose", "edit", "judge", "route",
                                          "total"}
    # Without --count: every photo × --edits-per-image.
    assert main([*argv, "--defect-rate", "0.0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 6 and report["defective"] == 0 and report["clean"] >= 1


@pytest.mark.parametrize(
    "argv, wanted",
    [(["--defect-rate", "0.5"], "needs --count"),
     (["--count", "2", "--defect-rate", "0.5", "--source", "folder", "--source-path", "/nonexistent/dir"],
      "/nonexistent/dir"),
     (["--count", "2", "--defect-rate", "0.5", "--source", "nope"], "nope"),
     (["--count", "2", "--defect-rate", "0.5", "--editor", "nope"], "nope")],
)
def test_cli_bad_source_or_backend_is_a_one_line_error(argv, wanted, capsys):
    from flows.cli import main

    assert main(["judge-bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and wanted in err and "Traceback" not in err
