"""`mcie --help` everywhere: every command has a description and a one-line example that parses,
every option has help text; `mcie build --license` reaches config.json and the dataset card."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import EXAMPLES, build_parser
from flows.plan import prepare_build
from pipeline.config import BuildConfig, ConfigError
from pipeline.dataset.card import write_card
from pipeline.dataset.output import finalize, write_unit
from pipeline.unit import UnitPipeline

ROOT = Path(__file__).resolve().parents[1]


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _commands(sub, (*path, name))


def test_every_option_of_every_command_has_help():
    commands = list(_commands(build_parser()))
    assert len(commands) >= 18
    missing = [f"mcie {' '.join(path)} {a.option_strings or a.dest}"
               for path, sub in commands for a in sub._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help and a.help.strip())]
    assert missing == []


def test_every_command_has_a_description_and_an_example_that_parses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples' relative paths: checked, never created
    for path, sub in _commands(build_parser()):
        command = " ".join(path)
        assert sub.description, command
        example = EXAMPLES[command]
        assert sub.epilog == f"example: {example}"
        assert example.startswith(f"mcie {path[0]} ")
        build_parser().parse_args(shlex.split(example)[1:])  # a usage error would raise
        # the example stays one line in the rendered help, to copy and paste
        assert f"example: {example}\n" in sub.format_help()
    assert list(tmp_path.iterdir()) == []


def test_each_default_shows_once_and_each_example_once_in_every_commands_help():
    """argparse's formatter added "(default: None)" after "(default 120)"; export printed its
    example as description and epilog."""
    checked = 0
    for path, sub in _commands(build_parser()):
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.help or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            text = formatter._expand_help(action)
            assert text.lower().count("default") <= 1, (path, action.option_strings, text)
            assert "(default: None)" not in text and "(default: )" not in text and "(default: [])" not in text
            said = "default" in action.help.lower()
            if not said and action.default not in (None, "", [], False) and action.option_strings:
                assert text.endswith(f"(default: {action.default})"), (path, action.option_strings, text)
                checked += 1
        help_text = sub.format_help()
        assert help_text.count("example: ") == 1, (path, help_text)
    assert checked >= 20  # the shown defaults: --seed 0, --workers 2, --format ip2p, ...


def test_help_shows_the_example_and_defaults():
    done = subprocess.run([sys.executable, "-m", "flows.cli", "review", "push", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "example: mcie review push out/demo" in done.stdout
    assert "tasks per import request (default: 20)" in done.stdout


def _tiny_build(out: Path, config: BuildConfig) -> None:
    prepare_build(out, config)
    pipeline = UnitPipeline(config, out)
    for unit in range(config.num_units(config.count)):
        write_unit(out, unit, pipeline.process(unit))
    finalize(out)
    write_card(out)


def _card_license(out: Path) -> str:
    header = (out / "README.md").read_text().split("---")[1]
    return json.loads(next(line for line in header.splitlines() if line.startswith("license:"))[len("license:"):])


def test_build_license_is_in_config_and_card(tmp_path):
    config = BuildConfig(count=2, resolution=64, shard_size=2, seed=5, license="cc-by-4.0")
    _tiny_build(tmp_path / "licensed", config)
    saved = json.loads((tmp_path / "licensed" / "config.json").read_text())
    assert saved["license"] == "cc-by-4.0"
    assert BuildConfig.from_dict(saved) == config  # part of the build's identity
    assert _card_license(tmp_path / "licensed") == "cc-by-4.0"
    assert json.loads((tmp_path / "licensed" / "stats.json").read_text())["license"] == "cc-by-4.0"

    # no --license: config.json has no such key (earlier builds resume), the card says the sources'
    _tiny_build(tmp_path / "default", BuildConfig(count=2, resolution=64, shard_size=2, seed=5))
    assert "license" not in json.loads((tmp_path / "default" / "config.json").read_text())
    stats = json.loads((tmp_path / "default" / "stats.json").read_text())
    expected = stats["source_licenses"][0] if len(stats["source_licenses"]) == 1 else "other"
    assert _card_license(tmp_path / "default") == expected


def test_a_bad_license_is_one_line_and_creates_nothing(tmp_path):
    with pytest.raises(ConfigError, match="license"):
        BuildConfig(count=2, license="x\ny")
    out = tmp_path / "never"
    done = subprocess.run([sys.executable, "-m", "flows.cli", "build", "--out", str(out), "--count", "2",
                           "--license", "a" * 101], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "license" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()
