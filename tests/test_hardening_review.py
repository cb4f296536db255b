"""Issue 17, items 2, 5 and 7 for Label Studio: against a misbehaving local server (one that
ignores ?page=, answers too much, or pages forever), every review command ends, with one line;
garbage in its annotations costs one warning, not the pull."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlparse

import pytest

from annotation.client import Connection, LabelStudioMisbehaving, connect, list_pages
from annotation.sync import collect_votes, project_tasks
from flows.cli import main

TITLE = "mcie review out"


class Misbehaving(BaseHTTPRequestHandler):
    """A Label Studio look-alike: whoami, one project, and tasks the way `mode` says."""

    mode = "ignores-page"
    requests: list[str] = []
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def answer(self, body: bytes, declared: int | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body) if declared is None else declared))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client refused to read it all
            self.close_connection = True

    def do_GET(self):  # noqa: N802
        url = urlparse(self.path)
        query = parse_qs(url.query)
        type(self).requests.append(url.path)
        if url.path == "/api/current-user/whoami":
            return self.answer(json.dumps({"id": 1, "email": "a@b.c"}).encode())
        if url.path == "/api/projects/":
            return self.answer(json.dumps({"count": 1, "results": [{"id": 7, "title": TITLE}]}).encode())
        if url.path == "/api/tasks/":
            page = int(query.get("page", ["1"])[0])
            if self.mode == "ignores-page":  # the same first page, whatever ?page= says
                tasks = [{"id": i, "data": {"sample_id": f"s0-{i:016x}"}} for i in range(1, 101)]
                return self.answer(json.dumps({"total": 250, "tasks": tasks}).encode())
            if self.mode == "endless":  # a fresh page every time, a total it never reaches
                tasks = [{"id": page * 1000 + i, "data": {}} for i in range(100)]
                return self.answer(json.dumps({"total": 10**9, "tasks": tasks}).encode())
            if self.mode == "huge":
                return self.answer(b'{"total": 1, "tasks": [' + b" " * (4 << 20) + b"]}")
            if self.mode == "lies":  # declares a body far over the cap
                return self.answer(b"{}", declared=1 << 40)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_PATCH(self):  # noqa: N802  (push brings the project's labeling config up to date)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).requests.append(self.path)
        self.answer(json.dumps({"id": 7, "title": TITLE}).encode())


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    Misbehaving.requests = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def tasks_of(url: str, mode: str, **conn_options):
    Misbehaving.mode = mode
    conn = Connection(url=url, api_key="0123456789abcdef0123", **conn_options)
    return project_tasks(connect(conn), 7, False, conn)


def test_a_server_that_ignores_the_page_is_asked_a_bounded_number_of_times(server):
    with pytest.raises(LabelStudioMisbehaving, match="reports 250 tasks but 4 pages of 100 held 100"):
        tasks_of(server, "ignores-page")
    assert Misbehaving.requests.count("/api/tasks/") == 4  # ceil(250 / 100) + 1, not 130,000


def test_a_server_that_pages_forever_meets_the_deadline(server):
    with pytest.raises(LabelStudioMisbehaving, match="deadline of 1 s passed"):
        tasks_of(server, "endless", deadline_s=1.0)
    assert 0 < Misbehaving.requests.count("/api/tasks/") < 10**4


@pytest.mark.parametrize("mode", ["huge", "lies"])
def test_an_answer_over_the_cap_is_refused(server, mode):
    with pytest.raises(LabelStudioMisbehaving, match="over"):
        tasks_of(server, mode, max_answer_bytes=1 << 20)


def test_a_review_command_against_it_ends_with_one_line(server, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    (out / "review").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"shard_size": 4}))
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "0123456789abcdef0123")
    Misbehaving.mode = "ignores-page"
    for action in ("pull", "push"):
        assert main(["review", action, str(out), "--url", server, "--project", TITLE]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "does not page" in err[0], (err, Misbehaving.requests)
    assert main(["review", "pull", str(out), "--url", server, "--deadline-s", "0"]) == 2


def task(task_id: int, data, annotations) -> SimpleNamespace:
    return SimpleNamespace(id=task_id, data=data, annotations=annotations)


def vote(verdict: str, annotation_id: int = 1) -> dict:
    return {"id": annotation_id, "completed_by": annotation_id, "created_at": "t", "result": [
        {"from_name": "verdict", "value": {"choices": [verdict]}}]}


def test_label_studio_garbage_costs_one_warning_not_the_pull(caplog):
    good = "s0-00000000000000aa"
    votes = collect_votes([
        task(1, {"sample_id": good, "num_sub_instructions": 2}, [vote("Accept")]),
        task(2, {"sample_id": "s0-00000000000000bb", "num_sub_instructions": "lots"}, [vote("Reject")]),
        task(3, {"sample_id": "s0-00000000000000cc"}, [{"id": 5, "result": ["not a region"]}]),
        task(4, {"sample_id": "../../victim"}, [vote("Accept")]),
        task(5, "not a dict", [vote("Accept")]),
    ])
    assert list(votes) == [good] and votes[good][0].verdict == "accept"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 3, warnings
    assert all("\n" not in w for w in warnings)
    assert "'lots'" in warnings[0] and "AttributeError" in warnings[1] and "'../../victim'" in warnings[2]


def test_pages_stop_at_the_reported_total():
    pages = []

    def page(n):
        pages.append(n)
        return SimpleNamespace(items=[SimpleNamespace(id=n * 10 + i) for i in range(10)],
                               has_next=True, get_next=lambda: page(n + 1),
                               response=SimpleNamespace(total=25))

    assert len(list_pages(page(1), "tasks", 10)) == 30 and pages == [1, 2, 3]


# ---- item 8: `mcie labelstudio serve` defaults ----------------------------------------------------

def test_label_studio_serve_keeps_its_data_out_of_the_repo_and_gets_no_secrets():
    from annotation.server import REPO_ROOT, ServerConfig, server_env
    from flows.cli import build_parser

    args = build_parser().parse_args(["labelstudio", "serve"])
    for folder in (args.data_dir, args.document_root):
        assert not Path(folder).resolve().is_relative_to(REPO_ROOT)
        assert not Path.cwd().resolve().is_relative_to(Path(folder).resolve())
    config = ServerConfig(password="p" * 8, token="t" * 20, data_dir=args.data_dir,
                          document_root=args.document_root)
    assert not Path(ServerConfig(password="p" * 8, token="t" * 20).data_dir).is_relative_to(REPO_ROOT)
    env = server_env(config, base={
        "PATH": "/usr/bin", "HOME": "/home/u", "MCIE_JUDGE_API_KEY": "judge-secret",
        "AWS_SECRET_ACCESS_KEY": "aws-secret", "LABEL_STUDIO_API_KEY": "client-key",
        "PYTHONPATH": str(REPO_ROOT), "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "false"})
    assert env["PATH"] == "/usr/bin" and env["HOME"] == "/home/u"
    assert not {"MCIE_JUDGE_API_KEY", "AWS_SECRET_ACCESS_KEY", "LABEL_STUDIO_API_KEY", "PYTHONPATH"} & set(env)
    assert env["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"] == str(Path(args.document_root).resolve())
    assert env["LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK"] == "true"  # ours win


# ---- issue 24: a review command without an API key is a usage error ----------------------------

@pytest.mark.parametrize("action", ["push", "pull", "status"])
def test_a_review_command_without_an_api_key_is_a_usage_error(tmp_path, monkeypatch, capsys, action):
    out = tmp_path / "out"
    (out / "review").mkdir(parents=True)
    before = sorted(p.name for p in out.rglob("*"))
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    assert main(["review", action, str(out), "--url", "http://127.0.0.1:9"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "LABEL_STUDIO_API_KEY" in err[0] and "Traceback" not in captured.err
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing made, not even a lock
