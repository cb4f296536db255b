"""`mcie import`: an existing edit dataset (MagicBrush, UltraEdit, ImgEdit, generic jsonl) into a
build directory, through the same Prefect flow on Ray as `mcie build`.

The import is a build whose front seats are the importer (`pipeline.importers.seats`): source
`import` over the dataset's sorted session keys, grounder/composer/editor `imported`. So work
units, the configured judge and routing, shards, manifest, report, `mcie verify` and resume are
the build's own; re-running the same command on a finished OUT does nothing and says so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pipeline.cli_args import add_judge_arguments, judge_options, non_negative_int, positive_int, resolution

FORMATS = ("magicbrush", "ultraedit", "imgedit", "generic")


def register(subparsers: Any) -> None:
    from flows.cli import writable_dir

    p = subparsers.add_parser(
        "import", help="import an edit dataset (MagicBrush, UltraEdit, ImgEdit, jsonl) as a build",
        description="Import an existing edit dataset from local files as complex, region-annotated "
                    "samples: one sample per session (of one turn or more). Example: mcie import --format "
                    "magicbrush --input MagicBrush/data --split dev --out OUT --judge none")
    p.add_argument("--format", required=True, choices=FORMATS, help="the dataset's published layout")
    p.add_argument("--input", required=True, help="the dataset's files (parquet shards folder, jsonl)")
    p.add_argument("--out", required=True, type=writable_dir, help="output directory")
    p.add_argument("--split", help="only this split (MagicBrush train/dev, an ImgEdit file stem, …)")
    p.add_argument("--images", help="imgedit: the folder its image tars were extracted into")
    p.add_argument("--masks", help="imgedit: the recap json(s) with COCO-RLE object masks")
    p.add_argument("--min-edits", type=positive_int, default=1,
                   help="skip sessions with fewer turns (default 1: a single-turn session is a sample)")
    p.add_argument("--max-edits", type=positive_int, default=8, help="keep the first N turns")
    p.add_argument("--resolution", type=resolution, default=512,
                   help="short image side in px (the long side follows the aspect, centre-cropped "
                        "to a multiple of 64: never stretched)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="build seed: with the source key it fixes every sample id")
    p.add_argument("--shard-size", type=positive_int, default=64, help="sessions per work unit")
    p.add_argument("--workers", type=positive_int, default=2, help="Ray workers (actors)")
    p.add_argument("--ray-address", default=None, help="existing Ray cluster (else $RAY_ADDRESS or local)")
    add_judge_arguments(p)
    p.description += "; --judge none trusts the dataset's curation and accepts every pair"
    p.set_defaults(func=run_import)


def import_config(args: argparse.Namespace):
    """The BuildConfig of an import (ConfigError/ValueError for bad arguments)."""
    from pipeline.config import BuildConfig

    options = {"format": args.format, "path": args.input}
    for name in ("split", "images", "masks"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    return BuildConfig(
        seed=args.seed, resolution=args.resolution, shard_size=args.shard_size, defect_rate=0.0,
        min_edits=args.min_edits, max_edits=args.max_edits, judge=args.judge,
        judge_options=judge_options(args), source="import", source_options=options,
        grounder="imported", composer="imported", editor="imported")


def _usage(message: str) -> int:
    print(f"mcie import: error: {message}", file=sys.stderr)
    return 2


def run_import(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError
    from pipeline.judges.base import make_judge
    from pipeline.unit import make_source

    try:
        make_judge(args.judge, **judge_options(args))  # name and options; opens no connection
        config = import_config(args)
        if not Path(args.input).exists():
            raise ValueError(f"input path does not exist: {args.input}")
        source = make_source(config)
        keys = source.keys()
        if not keys:
            raise ValueError(f"no session of {args.input} has at least {config.min_edits} turns "
                             f"({source.found} sessions found)")
    except (ConfigError, ValueError, TypeError, OSError) as exc:
        return _usage(str(exc))
    print(f"{args.format}: {source.found} sessions, {source.skipped} skipped "
          f"(fewer than {config.min_edits} turns), {len(keys)} to import")
    from flows.cli import UsageError, launch_build

    try:
        return launch_build(args.out, config, args.workers, args.ray_address, command="import")
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
