"""Argument types, the judge options and the front seats' flags shared by `mcie` subcommands.

argparse turns an `ArgumentTypeError` into a one-line usage error (exit 2)."""

from __future__ import annotations

import argparse
import json
from typing import Any

# A judge that is down costs one timeout per unit, not timeout x retries x pairs (issue 17).
DEFAULT_JUDGE_BREAKER = 32


def _number(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _number(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int, "a non-negative integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float, "a positive number")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def rate(text: str) -> float:
    value = _number(text, float, "within 0..1")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within 0..1, got {text}")
    return value


def resolution(text: str) -> int:
    value = positive_int(text)
    if not 64 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"resolution must be within 64..4096 px, got {value}")
    return value


def add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    """Judge selection shared by build, eval and judge-bench."""
    parser.add_argument("--judge", default="pixel", help="judge backend: pixel (embedded) or vllm")
    parser.add_argument("--judge-url", help="vLLM OpenAI-compatible base URL, e.g. http://HOST:8000/v1")
    parser.add_argument("--judge-model", help="model name served by vLLM")
    parser.add_argument("--judge-max-in-flight", type=positive_int,
                        help="concurrent judge requests per worker")
    parser.add_argument("--judge-timeout", type=positive_float, metavar="SECONDS",
                        help="vllm judge: seconds per request, queueing included (default 120)")
    parser.add_argument("--judge-retries", type=non_negative_int, metavar="N",
                        help="vllm judge: retries of a request after a timeout, a refused "
                             "connection, 429 or 5xx (default 5)")
    parser.add_argument("--judge-breaker", type=non_negative_int, metavar="N",
                        help="vllm judge: after N consecutive failed requests the rest of the "
                             f"unit's pairs are judge_error at once, for `mcie rejudge` (default "
                             f"{DEFAULT_JUDGE_BREAKER}; 0: never)")


def judge_options(args: argparse.Namespace) -> dict[str, Any]:
    """The judge's keyword options from `add_judge_arguments`' flags; ValueError if incomplete."""
    options: dict[str, Any] = {}
    if args.judge_url:
        options["url"] = args.judge_url
    if args.judge_model:
        options["model"] = args.judge_model
    if args.judge_max_in_flight:
        options["max_in_flight"] = args.judge_max_in_flight
    for flag, name in (("judge_timeout", "timeout_s"), ("judge_retries", "max_retries"),
                       ("judge_breaker", "breaker_failures")):
        value = getattr(args, flag, None)
        if value is not None:
            options[name] = value
    if args.judge == "vllm":
        options.setdefault("breaker_failures", DEFAULT_JUDGE_BREAKER)
    if args.judge == "vllm" and "url" not in options:
        raise ValueError(f"--judge {args.judge} needs --judge-url")
    return options


def key_value(text: str) -> tuple[str, Any]:
    """KEY=VALUE, the value read as JSON where it parses (3, 0.5, true, [1, 2]), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_seat_arguments(parser: argparse.ArgumentParser) -> None:
    """The front seats' flags (source, grounder, editor), shared by build and judge-bench."""
    parser.add_argument("--source", default="procedural",
                        help="source backend: procedural (default), folder, list, webdataset, parquet")
    parser.add_argument("--source-path", help="the folder, list file, tar shards or parquet to read")
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="list and parquet sources: read absolute paths and paths leading "
                             "outside the list/parquet file's folder (refused per item by default)")
    parser.add_argument("--edits-per-image", type=positive_int, default=1,
                        help="different complex instructions per source image")
    parser.add_argument("--min-side", type=positive_int,
                        help="file sources: quarantine images whose shorter side is under this (px)")
    parser.add_argument("--max-aspect", type=float,
                        help="file sources: quarantine images longer than this many times their width")
    parser.add_argument("--grounder", default="",
                        help="grounder backend: given (regions from the source) or classical "
                             "(default for photos)")
    parser.add_argument("--editor", default="",
                        help="editor backend: procedural (default for procedural scenes) or photo")
    for seat in ("source", "grounder", "editor"):
        parser.add_argument(f"--{seat}-option", action="append", type=key_value, default=[],
                            metavar="KEY=VALUE", help=f"an option of the {seat} backend (repeatable)")


def seat_fields(args: argparse.Namespace) -> dict[str, Any]:
    """BuildConfig's seat fields from `add_seat_arguments`' flags (the shorthands --source-path,
    --min-side, --max-aspect and --allow-outside-root join the source's options)."""
    source_options = dict(args.source_option)
    for name, value in (("path", args.source_path), ("min_side", args.min_side),
                        ("max_aspect", args.max_aspect)):
        if value is not None:
            source_options[name] = value
    if getattr(args, "allow_outside_root", False):
        source_options["allow_outside_root"] = True
    return {"source": args.source, "source_options": source_options,
            "grounder": args.grounder, "grounder_options": dict(args.grounder_option),
            "editor": args.editor, "editor_options": dict(args.editor_option),
            "edits_per_image": args.edits_per_image}
