"""`mcie review push|pull|status OUT` and `mcie labelstudio serve`.

`register(subparsers)` adds both sub-commands; handlers return exit codes: 0 ok, 1 a Label
Studio / server problem (one line, no traceback; also a push that left any queued sample out),
2 bad arguments (a missing API key included).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

from annotation.client import DEADLINE_S, KEY_ENV, Connection, LabelStudioError
from annotation.server import (
    DEFAULT_DATA_DIR,
    DEFAULT_DOCUMENT_ROOT,
    LabelStudioServer,
    ServerConfig,
    ServerError,
    ensure_ls_venv,
)
from annotation.sync import IMAGE_MODES, ReviewSettings, pull, push, status
from pipeline import storage
from pipeline.dataset.lock import OutLocked

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    review = subparsers.add_parser("review", help="human review of borderline samples in Label Studio")
    actions = review.add_subparsers(dest="review_action", required=True)
    for name, helptext in (
        ("push", "import queued borderline samples into the Label Studio project"),
        ("pull", "apply finished annotations: decided samples go to the shards and the manifest"),
        ("status", "queued / imported / annotated / decided counts and judge-vs-human agreement"),
    ):
        sub = actions.add_parser(name, help=helptext)
        sub.add_argument("out",
                         help="build output folder (OUT), or its URL (s3://bucket/out)")
        sub.add_argument("--project", help="project title (default: 'mcie review <OUT name>')")
        sub.add_argument("--url", help="Label Studio URL (default: $LABEL_STUDIO_URL)")
        sub.add_argument("--annotations-per-task", type=int, default=1,
                         help="votes needed before the majority decides (ties stay open)")
        sub.add_argument("--lean-threshold", type=float, default=0.5,
                         help="judge overall score at or above which it leans accept")
        sub.add_argument("--deadline-s", type=float, default=DEADLINE_S,
                         help="give up after this many seconds, all requests together "
                              f"(default {DEADLINE_S:g})")
        if name == "push":
            sub.add_argument("--images", choices=IMAGE_MODES, default="auto",
                             help="local-files (server shares the disk), inline (data URLs), auto")
            sub.add_argument("--batch-size", type=int, default=20,
                             help="tasks per import request")
        sub.set_defaults(func=_review_handler(name))

    ls = subparsers.add_parser("labelstudio", help="run a local Label Studio server")
    ls_actions = ls.add_subparsers(dest="labelstudio_action", required=True)
    serve = ls_actions.add_parser(
        "serve", help="start Label Studio on 127.0.0.1 (admin and token from LABEL_STUDIO_USERNAME, "
        "LABEL_STUDIO_PASSWORD, LABEL_STUDIO_USER_TOKEN)")
    serve.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1")
    serve.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                       help=f"the server's database and media (default: {DEFAULT_DATA_DIR})")
    serve.add_argument("--document-root", type=Path, default=DEFAULT_DOCUMENT_ROOT,
                       help="the only folder served as local files: build outputs under it are shown from "
                            f"disk, others are pushed inline (default: {DEFAULT_DOCUMENT_ROOT})")
    serve.set_defaults(func=_serve)


def _settings(args: argparse.Namespace) -> ReviewSettings:
    return ReviewSettings(
        project=args.project,
        image_mode=getattr(args, "images", "auto"),
        annotations_per_task=args.annotations_per_task,
        batch_size=getattr(args, "batch_size", 20),
        lean_threshold=args.lean_threshold,
    )


def _review_handler(action: str):
    def handle(args: argparse.Namespace) -> int:
        try:
            settings = _settings(args)
            conn = Connection.from_env(url=args.url, deadline_s=args.deadline_s)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if not conn.api_key:  # a usage error, found before anything is touched
            print(f"error: no API key: set {KEY_ENV} (a legacy token or personal access token "
                  f"of {conn.url})", file=sys.stderr)
            return 2
        try:  # a location only now: --storage-option is in the environment once arguments are parsed
            out = storage.location(args.out)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if not out.is_dir():
            print(f"error: {out} is not a build output folder", file=sys.stderr)
            return 2
        try:
            if action == "push":
                r = push(out, conn, settings)
                print(r.summary())
                if r.failure():  # every borderline must reach a reviewer: a gap fails the command
                    print(f"error: {r.failure()}", file=sys.stderr)
                    return 1
            elif action == "pull":
                r = pull(out, conn, settings)
                print(r.summary())
            else:
                print("\n".join(status(out, conn, settings).lines()))
        except OutLocked as exc:  # another writer holds OUT: refused at once
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except (LabelStudioError, RuntimeError, ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0

    return handle


class _Stop(Exception):
    """SIGTERM / SIGHUP to `mcie labelstudio serve`: stop the server it started, then exit."""


def _stop_on_signal(signum, frame) -> None:
    raise _Stop(signal.Signals(signum).name)


def _serve(args: argparse.Namespace) -> int:
    try:
        config = ServerConfig.from_env(port=args.port, data_dir=args.data_dir,
                                       document_root=args.document_root)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # The server runs in its own process group (so a Ctrl+C in the terminal reaches us, not it):
    # a SIGTERM to us would leave it listening unless we stop it ourselves.
    previous = {sig: signal.signal(sig, _stop_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    server = None
    stopped_by = None
    try:
        Path(config.document_root).mkdir(parents=True, exist_ok=True)
        ensure_ls_venv()
        server = LabelStudioServer(config)
        server.start()
        print(f"Label Studio is up at {server.url} (admin {config.username}); "
              f"for mcie: LABEL_STUDIO_URL={server.url} LABEL_STUDIO_API_KEY=<your LABEL_STUDIO_USER_TOKEN>; "
              "Ctrl+C or SIGTERM stops it", flush=True)
        while server.process is not None and server.process.poll() is None:
            time.sleep(1)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        stopped_by = "SIGINT"
    except _Stop as exc:
        stopped_by = str(exc)
    finally:
        for sig in previous:  # a second signal must not cut the stop short
            signal.signal(sig, signal.SIG_IGN)
        if server is not None:
            server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped_by:
        print(f"Label Studio stopped ({stopped_by})", flush=True)
    return 0
