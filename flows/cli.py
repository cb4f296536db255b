"""The `mcie` command line. Each area registers its own subcommands; heavy imports stay lazy."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.cli_args import (add_judge_arguments, add_seat_arguments, judge_options, key_value,
                               non_negative_int, positive_int, rate, resolution, seat_fields)

# Modules that add subcommands with `register(subparsers)`, in the order `mcie --help` lists them.
COMMAND_MODULES = (
    "flows.import_data",
    "pipeline.dataset.verify",
    "pipeline.dataset.export",
    "pipeline.dataset.rejudge",
    "pipeline.judges.bench",
    "annotation.cli",
    "trainer.cli",
    "pipeline.ciebench.cases",
    "trainer.evaluate",
)


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default once; the example line is kept whole, to copy and paste.

    A help text that already says its default ("(default 120)", "default: the build's") gets no
    second one, and an empty default (None, "", [], False) is not shown: argparse's own formatter
    printed "(default 120) (default: None)"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        empty = action.default is None or action.default is False or action.default in ("", [])
        if "default" in text.lower() or empty or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example: "):
            return indent + text
        return super()._fill_text(text, width, indent)


# One line per command, shown under its --help ("example: ..."), keyed by the command's path.
EXAMPLES = {
    "build": "mcie build --out out/demo --count 300 --shard-size 50 --license cc-by-4.0",
    "unlock": "mcie unlock s3://bucket/demo",
    "import": "mcie import --format magicbrush --input MagicBrush/ --out out/magicbrush",
    "verify": "mcie verify out/demo",
    "export": "mcie export out/demo --format ip2p --out out/demo-ip2p --verdict accept",
    "rejudge": "mcie rejudge out/demo --judge vllm --judge-url http://127.0.0.1:8000/v1",
    "judge-bench": "mcie judge-bench --count 200 --defect-rate 0.5",
    "review": "mcie review push out/demo",
    "review push": "mcie review push out/demo --url http://127.0.0.1:8080",
    "review pull": "mcie review pull out/demo",
    "review status": "mcie review status out/demo",
    "labelstudio": "mcie labelstudio serve --port 8080",
    "labelstudio serve": "mcie labelstudio serve --port 8080 --document-root ~/mcie-data",
    "train": "mcie train --data out/demo --config tiny --steps 30 --out out/demo/ckpt",
    "train-cache": "mcie train-cache --data out/demo --out out/demo/cache --config tiny",
    "edit": "mcie edit --checkpoint out/demo/ckpt --image photo.png --instruction "
            "'make the cup blue' --out edited.png",
    "bench": "mcie bench build --out out/ciebench --count 100",
    "bench build": "mcie bench build --out out/ciebench --count 100",
    "eval": "mcie eval --bench out/ciebench --checkpoint out/demo/ckpt --out out/eval",
}

def finish_help(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> None:
    """Give every command's --help a description and a one-line example (each module writes its
    options' help itself)."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        action.help = action.help or "the action, one of: " + ", ".join(action.choices)
        summaries = {a.dest: a.help for a in action._choices_actions}
        for name, sub in action.choices.items():
            command = " ".join((*path, name))
            if not sub.description and summaries.get(name):
                sub.description = summaries[name][0].upper() + summaries[name][1:] + "."
            if sub.formatter_class in (argparse.HelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
                sub.formatter_class = HelpWithDefaults  # defaults shown, the example kept whole
            if command in EXAMPLES and not sub.epilog:
                sub.epilog = f"example: {EXAMPLES[command]}"
            finish_help(sub, (*path, name))


class UsageError(Exception):
    """A bad argument: one line on stderr, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit 2), not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message}")


class SubParser(Parser):
    """A command's parser: one-line usage errors, and --help with defaults."""

    def __init__(self, *args: Any, formatter_class: Any = HelpWithDefaults, **kwargs: Any) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def writable_dir(text: str) -> str:
    """A directory that exists or can be made there: checked, not created — `run_build` creates it
    once every argument is valid, so a refused command leaves nothing behind. An object-store URL
    (`s3://bucket/prefix`) is taken as it is: `make_out_dir` finds out whether it can be written."""
    from pipeline import storage

    if storage.is_url(text):
        return text.rstrip("/")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write to {text}: not a directory")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write to {text}: permission denied")
    return str(path)


def is_build_or_empty(path: Path) -> bool:
    """A build may go into a new or empty directory, or resume one that holds a build. A writer's
    lock (or its probe) is not content: it is there while a build starts, before its config.json."""
    from pipeline.dataset.lock import LOCK_NAME

    return not path.is_dir() or (path / "config.json").is_file() or not any(
        not p.name.startswith((LOCK_NAME, ".write-probe")) for p in path.iterdir())


def make_out_dir(text: str) -> Path:
    """OUT as a location, made and probed: a local folder is created and a file written and
    removed; on an object store (no folders) a probe object is put and deleted, so a missing
    bucket or a refused write is one line here, not a traceback from a worker."""
    from pipeline import storage

    path = storage.location(text)
    if not storage.is_local(path):
        probe = path / f".write-probe-{os.getpid()}"
        try:
            storage.write_atomic(probe, b"")
            storage.remove_tree(probe)
        except Exception as exc:  # noqa: BLE001 - botocore's errors are not all OSErrors
            reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:200] or type(exc).__name__
            raise UsageError(f"mcie build: error: cannot write to {text}: {reason}") from None
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"mcie build: error: cannot write to {text}: {exc.strerror or exc}") from None
    return path


def register_build(subparsers) -> None:
    p = subparsers.add_parser(
        "build", help="build a complex-edit dataset (Prefect flow on Ray)",
        description="Build a complex-edit dataset. Examples: mcie build --out OUT --count 1000 "
                    "(procedural scenes); mcie build --out OUT --source folder --source-path PHOTOS "
                    "(every photo once, classical grounding, the embedded photo editor)")
    p.add_argument("--out", required=True, type=writable_dir, help="output directory")
    p.add_argument("--count", type=positive_int, default=None,
                   help="number of samples (needed for procedural; default: every image of the "
                        "source × --edits-per-image)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="build seed: with the source key it fixes every sample id and edit")
    p.add_argument("--resolution", type=resolution, default=512,
                   help="short image side in px (the long side is centre-cropped to a multiple of 64)")
    p.add_argument("--license", default="",
                   help="the dataset's license for its card and config.json (e.g. cc-by-4.0); "
                        "default: the sources' own licenses")
    add_seat_arguments(p)
    p.add_argument("--rewriter", default="",
                   help="instruction rewriter: vllm (an LLM rewrites the grammar-joined "
                        "instruction; a rewrite that loses a target or attribute is refused)")
    # Generative editors (inpaint, instruct, routed): shorthands for their --editor-option's.
    p.add_argument("--editor-path", help="editor inpaint/instruct: the diffusers pipeline's directory")
    p.add_argument("--editor-steps", type=positive_int, help="generative editor: denoising steps")
    p.add_argument("--editor-guidance", type=float, help="generative editor: guidance scale")
    p.add_argument("--editor-device", help="generative editor: torch device (cpu, cuda, cuda:1)")
    p.add_argument("--editor-dtype", choices=("float32", "float16", "bfloat16"),
                   help="generative editor: weights dtype")
    p.add_argument("--candidates", type=positive_int,
                   help="generative editor: candidates per sub-edit, the judge keeps the best "
                        "(the others go to OUT/preference as negatives)")
    p.add_argument("--num-gpus", type=float, default=0,
                   help="GPUs each Ray worker asks for (a generative editor on a cluster)")
    p.add_argument("--rewriter-option", action="append", type=key_value, default=[],
                   metavar="KEY=VALUE", help="an option of the rewriter backend (repeatable)")
    p.add_argument("--workers", type=positive_int, default=2, help="Ray workers (actors)")
    p.add_argument("--shard-size", type=positive_int, default=64,
                   help="samples per work unit; each unit writes one train and one negatives shard")
    p.add_argument("--defect-rate", type=rate, default=0.25,
                   help="share of pairs the procedural editor spoils on purpose")
    p.add_argument("--min-edits", type=positive_int, default=2,
                   help="fewest sub-edits in one complex instruction")
    p.add_argument("--max-edits", type=positive_int, default=5,
                   help="most sub-edits in one complex instruction")
    p.add_argument("--ray-address", default=None, help="existing Ray cluster (else $RAY_ADDRESS or local)")
    add_judge_arguments(p)
    p.set_defaults(func=run_build)


def register_unlock(subparsers) -> None:
    p = subparsers.add_parser(
        "unlock", help="remove OUT's writer lock left by a writer that is gone",
        description="Remove the writer lock of OUT (on an object store: the .mcie.lock object) after "
                    "naming its holder. Needed only when the holder ran on another machine and is "
                    "gone; a holder on this machine that is gone is taken over by the next writer, "
                    "and one that is alive is never unlocked.")
    p.add_argument("out", help="the build's output (a folder or an s3:// URL)")
    p.set_defaults(func=run_unlock)


def run_unlock(args: argparse.Namespace) -> int:
    from pipeline.dataset.lock import OutLocked, unlock

    try:
        who = unlock(args.out)
    except OutLocked as exc:
        raise UsageError(f"mcie unlock: error: {exc}") from None
    except OSError as exc:
        raise UsageError(f"mcie unlock: error: {args.out}: {exc.strerror or exc}") from None
    print(f"{args.out}: removed the lock of {who}" if who else f"{args.out}: not locked")
    return 0


def run_build(args: argparse.Namespace) -> int:
    from pipeline.config import BuildConfig, ConfigError
    from pipeline.judges.base import make_judge

    try:
        options = judge_options(args)
        make_judge(args.judge, **options)  # checks the name and options; opens no connection
    except (ValueError, TypeError) as exc:
        raise UsageError(f"mcie build: error: {exc}") from None
    seats = seat_fields(args)
    editor_options = seats["editor_options"]
    for name, value in (("path", args.editor_path), ("steps", args.editor_steps),
                        ("guidance", args.editor_guidance), ("device", args.editor_device),
                        ("dtype", args.editor_dtype), ("candidates", args.candidates)):
        if value is not None:
            editor_options[name] = value
    if not 0 <= args.num_gpus <= 64:
        raise UsageError(f"mcie build: error: --num-gpus must be within 0..64, got {args.num_gpus:g}")
    try:  # validate, and check a resumed OUT, before paying for Prefect and Ray start-up
        config = BuildConfig(
            count=args.count, seed=args.seed, resolution=args.resolution,
            shard_size=args.shard_size, defect_rate=args.defect_rate, min_edits=args.min_edits,
            max_edits=args.max_edits, judge=args.judge, judge_options=options, **seats,
            rewriter=args.rewriter, rewriter_options=dict(args.rewriter_option),
            license=args.license,
        )
        from pipeline.unit import make_source

        make_source(config)  # opens the source: a missing path is refused before OUT exists
        from pipeline.unit import front_stages

        front_stages(config)  # cheap (models load on first use): a bad editor path is refused here
    except (ConfigError, ValueError, TypeError, OSError) as exc:
        raise UsageError(f"mcie build: error: {exc}") from None
    return launch_build(args.out, config, args.workers, args.ray_address, args.num_gpus)


def launch_build(out_arg: str, config, workers: int, ray_address: str | None,
                 num_gpus: float = 0, command: str = "build") -> int:
    """Run a validated build (or import) into `out_arg`: refuse a non-empty directory that holds
    no build, take OUT's writer lock, fix the config and key list, skip a finished build, run the
    flow. Shared by `mcie build` and `mcie import`; `command` names it in messages."""
    from pipeline.dataset.lock import LockUnsupported, OutLocked, out_lock

    from pipeline import storage

    existed = storage.location(out_arg).exists()
    if existed and not is_build_or_empty(storage.location(out_arg)):
        raise UsageError(f"mcie {command}: error: {out_arg} is not empty and holds no build "
                         "(no config.json): choose a new or empty directory")
    out = make_out_dir(out_arg)
    try:
        with out_lock(out):  # one writer per OUT, from planning to the report
            return _locked_build(out, config, existed, workers, ray_address, num_gpus, command)
    except (OutLocked, LockUnsupported) as exc:
        raise UsageError(f"mcie {command}: error: {exc}") from None
    except OSError as exc:  # a read-only or full OUT: one line (see pipeline.dataset.lock)
        print(f"mcie {command}: failed: {exc}", file=sys.stderr)
        return 1


def _locked_build(out: Path, config, existed: bool, workers: int, ray_address: str | None,
                  num_gpus: float, command: str) -> int:
    from pipeline.config import ConfigError
    from pipeline.storage import remove_tree
    from flows.index import index_source
    from flows.plan import is_complete, prepare_build
    from flows.ray_runtime import cluster_address, ray_running, start_ray, stop_ray

    try:  # a first run fingerprints its corpus on the Ray workers (flows/index.py), started then
        prepare_build(out, config, index_maker=lambda c: index_source(c, workers, ray_address))
    except ConfigError as exc:
        if ray_running() and not cluster_address(ray_address):
            stop_ray()
        if not existed:  # a refused command leaves nothing behind
            try:
                remove_tree(out)
            except OSError:
                pass
        raise UsageError(f"mcie {command}: error: {exc}") from None

    if is_complete(out, config):  # decided from OUT alone: no Prefect, no Ray
        if ray_running() and not cluster_address(ray_address):
            stop_ray()
        print(f"{out}: {command} already complete, nothing to do")
        return 0
    # Start-up in parallel: Prefect's server starts in its own process while this one starts a
    # local Ray (the flow's process task finds it running, and stops it) and imports Prefect.
    server = TemporaryPrefectServer.get()
    from flows.plan import pending_units

    local_ray = not cluster_address(ray_address) and (ray_running() or bool(pending_units(out, config)))
    try:
        if local_ray:
            start_ray(None, workers)
        from flows.build import build_dataset
        from prefect.settings import PREFECT_API_URL, temporary_settings

        api = {PREFECT_API_URL: server.wait_ready()} if server else {}
        with temporary_settings(updates=api):
            result = build_dataset(
                out=str(out), workers=workers, ray_address=ray_address, num_gpus=num_gpus,
                **{k: v for k, v in config.to_dict().items() if k != "routing"},
            )
    except Exception as exc:  # Prefect has logged the details; the run can be resumed
        if type(exc).__name__ == "FailedRun":  # the flow ended itself with a one-line reason
            print(f"mcie {command}: failed: {exc}", file=sys.stderr)
        else:
            print(f"mcie {command}: failed: {type(exc).__name__}: {exc} (run the same command "
                  "to resume)", file=sys.stderr)
        return 1
    finally:
        if local_ray:
            stop_ray()  # the flow stops it after its units; not when it failed before them
    if result.get("already_complete"):
        print(f"{out}: {command} already complete, nothing to do")
    print(result["summary"])
    print(f"report: {result['report']}")
    return 0


class TemporaryPrefectServer:
    """Prefect's temporary API server (what Prefect starts itself when PREFECT_API_URL is unset:
    the same uvicorn command and environment), started by the CLI as soon as it knows a flow will
    run, so that the server's own start-up (its imports, the database check: the longest part of a
    small build's start-up) runs while the driver imports Prefect and starts Ray; the flow then
    talks to it by URL. One per process, stopped at exit: after Prefect's log and event workers
    have drained into it (they drain at thread shutdown, before `atexit`)."""

    _instance: "TemporaryPrefectServer | None" = None
    PORT_IN_USE = 3  # uvicorn's exit code when the port was taken meanwhile

    def __init__(self) -> None:
        self.process = None
        self.url = ""
        self._spawn()
        import atexit

        atexit.register(self.stop)

    @classmethod
    def get(cls) -> "TemporaryPrefectServer | None":
        """The process's server, started on the first call; None where PREFECT_API_URL names one."""
        if os.environ.get("PREFECT_API_URL"):
            return None
        if cls._instance is None or cls._instance.process is None:
            cls._instance = cls()
        return cls._instance

    def _spawn(self) -> None:
        import importlib.util
        import socket
        import subprocess

        with socket.socket() as probe:  # a free port (uvicorn exits with 3 if it is taken meanwhile)
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        app_dir = Path(importlib.util.find_spec("prefect").submodule_search_locations[0]).parent
        self.url = f"http://127.0.0.1:{port}/api"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "error", "--lifespan", "on"],
            env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                 "PREFECT__SERVER_FINAL": "1"})

    def wait_ready(self) -> str:
        """Wait for /health (up to PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); its URL."""
        import time
        import urllib.error
        import urllib.request

        timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "20"))
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code == self.PORT_IN_USE:
                self._spawn()
            elif code is not None:
                raise RuntimeError(f"Prefect's temporary server exited with code {code}")
            try:
                with direct.open(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self.url
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"Prefect's temporary server did not answer within {timeout:g} s "
                           "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")

    def stop(self) -> None:
        import subprocess

        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def build_parser() -> Parser:
    parser = Parser(prog="mcie", description="Complex image-editing dataset factory and MCIE-E1 trainer")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=SubParser)
    register_build(subparsers)
    register_unlock(subparsers)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(subparsers)
    add_storage_arguments(parser)
    finish_help(parser)
    return parser


# The ephemeral API's start-up timed out at Prefect's 20 s on a loaded machine; its database
# grew by every run forever: flow runs (and their events) older than a week are vacuumed.
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "events,flow_runs",
    "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD": str(7 * 24 * 3600),
}


def configure_environment() -> None:
    # Prefect's telemetry logs a harmless but alarming traceback when its local db is busy.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _clear_stale_lock(args) -> None:
    """A writer killed by kill -9 leaves its pid in OUT's lock file: cleared at the next command
    on OUT (`pipeline.dataset.lock.clear_stale`), so the file is empty whenever nobody holds it.
    On an object store a lock object whose holder on this host is gone is removed."""
    from pipeline import storage

    out = getattr(args, "out", None)
    if not isinstance(out, (str, os.PathLike)) or not out:
        return
    from pipeline.dataset.lock import clear_stale

    if storage.is_url(out):
        try:
            clear_stale(out)
        except Exception as exc:  # noqa: BLE001 - best effort: the command itself says what is wrong
            logging.getLogger(__name__).debug("no stale-lock check on %s: %s", out, exc)
    elif Path(out).is_dir():
        clear_stale(out)


# Commands that write into a build's OUT: they take its one-writer lock, and `--no-lock` skips it.
WRITING_COMMANDS = {("build",), ("import",), ("rejudge",), ("review", "push"), ("review", "pull")}


def add_storage_arguments(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> None:
    """Give every command `--storage-option KEY=VALUE` (fsspec options for URLs: endpoint,
    credentials, region) and the writing ones `--no-lock`, unless a module defined them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                add_storage_arguments(sub, (*path, name))
            return
    if not path:
        return
    if "--storage-option" not in parser._option_string_actions:
        parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                            help="an fsspec option for object-store URLs (s3://...), e.g. "
                                 "endpoint_url=http://host:8333 or anon=true (repeatable); "
                                 "credentials are best left to the AWS_* variables")
    if path in WRITING_COMMANDS and "--no-lock" not in parser._option_string_actions:
        parser.add_argument("--no-lock", action="store_true",
                            help="write without OUT's one-writer lock (for an object store that "
                                 "ignores If-None-Match; you make sure no other writer runs)")


def apply_storage_arguments(args: argparse.Namespace) -> None:
    """Put `--storage-option`s into MCIE_STORAGE_OPTIONS (over what it held: they apply to every
    protocol) and `--no-lock` into MCIE_NO_LOCK, before anything opens storage: Prefect tasks and
    local Ray workers inherit the environment. Values are never printed (they may be secrets)."""
    import json

    from pipeline import storage
    from pipeline.dataset.lock import NO_LOCK_ENV

    pairs = [p if isinstance(p, str) else "=".join(map(str, p))  # a module's own KEY=VALUE type
             for p in getattr(args, "storage_option", None) or []]
    if pairs:
        try:
            given = storage.parse_storage_options(pairs)
            current = json.loads(os.environ.get(storage.STORAGE_ENV, "") or "{}")
        except ValueError as exc:
            raise UsageError(f"mcie: error: {exc}") from None
        if not isinstance(current, dict):
            current = {}
        if any(isinstance(v, dict) for v in current.values()):  # {protocol: {...}, "*": {...}}
            current["*"] = {**current.get("*", {}), **given}
        else:
            current.update(given)
        os.environ[storage.STORAGE_ENV] = json.dumps(current)
    if getattr(args, "no_lock", False):
        os.environ[NO_LOCK_ENV] = "1"


def main(argv: list[str] | None = None) -> int:
    configure_environment()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        apply_storage_arguments(args)
        _clear_stale_lock(args)
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except Exception as exc:
        from pipeline.storage import access_error

        reason = access_error(exc)  # no credentials, no endpoint: the user's setting, one line
        if reason is None:
            raise
        print(f"mcie: error: cannot reach the object store: {reason}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mcie: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
