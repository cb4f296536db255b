"""Human review against a real Label Studio server (installed into .ls-venv, started on
127.0.0.1 by a session fixture): push, annotate through the REST API as annotators would, pull,
and the failure cases (push twice, server killed mid-push, crash mid-pull, wrong token).

Issue 24 (items 5 and 6, at the end): a photo build's borderlines all reach the server and come
back; what review changes, the build shows (report, stats.json, card, the instruction); a push
that leaves a sample out fails the command; `mcie labelstudio serve` stops its server on SIGTERM.
(One module, so the tests share one server: a fixture imported into two modules starts two.)"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter

import httpx
import pytest

from annotation import queue
from annotation.client import LabelStudioUnavailable, connect
from annotation.sync import (HIDDEN_COLUMNS, REVIEW_VIEW, ReviewSettings, find_project, project_tasks,
                             pull, push, status)
from annotation.tasks import labeling_config
from labelstudio_fixtures import (ROOT, TMP_ROOT, ls_conn, ls_server, make_build,  # noqa: F401
                                  make_photo_build, out_dir)
from pipeline.dataset.card import build_figures, render_card
from pipeline.dataset.output import read_manifest
from pipeline.dataset.report import render_report
from pipeline.dataset.shards import checksum, iter_tar_groups, member_metadata
from processes import free_port, session_processes

pytestmark = pytest.mark.slow


def _settings(name: str, **kw) -> ReviewSettings:
    return ReviewSettings(project=name, document_root=TMP_ROOT, **kw)


def _sample_ids_in_project(conn, title):
    client = connect(conn)
    project = find_project(client, title)
    return [t.data["sample_id"] for t in project_tasks(client, project.id, False)]


def _task_of(client, project_id, sample_id):
    return next(t for t in project_tasks(client, project_id, True) if t.data["sample_id"] == sample_id)


def annotate(conn, task_id, user_id, verdict, subs=(), comment=""):
    """POST an annotation the way the labeling UI submits it (REST), completed by `user_id`."""
    result = [{"from_name": "verdict", "to_name": "target", "type": "choices",
               "value": {"choices": [verdict]}}]
    for n, answer in enumerate(subs, start=1):
        result.append({"from_name": f"sub_{n}", "to_name": "target", "type": "choices",
                       "value": {"choices": [answer]}})
    if comment:
        result.append({"from_name": "comment", "to_name": "target", "type": "textarea",
                       "value": {"text": [comment]}})
    response = httpx.post(
        f"{conn.url}/api/tasks/{task_id}/annotations/",
        headers={"Authorization": f"Token {conn.api_key}"},
        json={"result": result, "completed_by": user_id, "lead_time": 4.2},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    return response.json()


def _user(client, email):
    existing = [u for u in client.users.list() if u.email == email]
    return existing[0] if existing else client.users.create(email=email, username=email.split("@")[0])


def test_push_is_idempotent_and_images_are_served(ls_conn, out_dir):  # noqa: F811
    queued = make_build(out_dir, borderline=5)
    settings = _settings("push-twice")
    first = push(out_dir, ls_conn, settings)
    assert (first.image_mode, first.queued, first.imported) == ("local-files", 5, 5)
    second = push(out_dir, ls_conn, settings)
    assert (second.project_id, second.already_imported, second.imported) == (first.project_id, 5, 0)
    assert sorted(_sample_ids_in_project(ls_conn, "push-twice")) == sorted(queued)

    client = connect(ls_conn)
    task = _task_of(client, first.project_id, queued[0])
    # the judge's opinion is a prediction with its name@version and overall score
    (prediction,) = task.predictions
    pred = prediction if isinstance(prediction, dict) else prediction.model_dump()
    assert pred["model_version"] == "test@1" and pred["score"] == pytest.approx(0.7)
    # the server serves the very bytes of the review queue
    image = httpx.get(ls_conn.url + task.data["source_image"], headers={"Authorization": f"Token {ls_conn.api_key}"})
    assert image.status_code == 200
    assert image.content == (out_dir / "review" / queued[0] / "source.png").read_bytes()


def test_inline_images_work_with_any_server(ls_conn, out_dir):  # noqa: F811
    queued = make_build(out_dir, borderline=1)
    result = push(out_dir, ls_conn, _settings("inline-images", image_mode="inline"))
    assert result.image_mode == "inline"
    task = project_tasks(connect(ls_conn), result.project_id, False)[0]
    prefix = "data:image/png;base64,"
    assert task.data["target_image"].startswith(prefix)
    assert base64.b64decode(task.data["target_image"][len(prefix):]) == (out_dir / "review" / queued[0] / "target.png").read_bytes()


def test_annotate_disagree_pull_and_status(ls_conn, out_dir):  # noqa: F811
    # leans: ids[0] accept (0.7), ids[1] reject (0.3), ids[2] accept, ids[3] reject
    ids = make_build(out_dir, borderline=4)
    settings = _settings("two-annotators", annotations_per_task=2)
    project_id = push(out_dir, ls_conn, settings).project_id
    client = connect(ls_conn)
    admin = client.users.whoami()
    alice, bob = _user(client, "alice@mcie.test"), _user(client, "bob@mcie.test")
    task = {sid: _task_of(client, project_id, sid).id for sid in ids}

    annotate(ls_conn, task[ids[0]], alice.id, "Accept", ["pass", "fail"], "second edit missed")
    annotate(ls_conn, task[ids[0]], bob.id, "Accept", ["pass", "pass"])
    annotate(ls_conn, task[ids[1]], alice.id, "Accept", ["pass", "pass", "pass"])
    annotate(ls_conn, task[ids[1]], bob.id, "Accept")
    annotate(ls_conn, task[ids[2]], alice.id, "Accept")  # the two disagree: a tie stays open
    annotate(ls_conn, task[ids[2]], bob.id, "Reject")
    annotate(ls_conn, task[ids[3]], alice.id, "Reject")  # one vote of two: open
    annotate(ls_conn, task[ids[3]], alice.id, "Reject")  # the same person again counts once

    result = pull(out_dir, ls_conn, settings)
    assert (result.decided, result.accepted, result.open, result.ties) == (2, 2, 2, 1)
    assert sorted(result.decided_ids) == sorted(ids[:2])
    assert queue.review_ids(out_dir) == sorted(ids[2:])

    rows = {r["id"]: r for r in read_manifest(out_dir).to_pylist()}
    assert (rows[ids[0]]["verdict"], rows[ids[0]]["verdict_by"]) == ("accept", "both")  # agreed with the lean
    assert (rows[ids[1]]["verdict"], rows[ids[1]]["verdict_by"]) == ("accept", "human")  # overrode it
    assert rows[ids[2]]["verdict"] == "borderline" and rows[ids[2]]["shard"] == f"review/{ids[2]}"
    shard = out_dir / "shards" / rows[ids[0]]["shard"]
    groups = list(iter_tar_groups(shard))
    assert [k for k, _ in groups].count(ids[0]) == 1
    members = dict(groups)[ids[0]]
    assert checksum(members) == rows[ids[0]]["checksum"]
    human = member_metadata(members)["human"]
    assert human["verdict"] == "accept" and human["votes"] == {"accept": 2, "reject": 0}
    assert sorted(a["annotator"] for a in human["annotations"]) == ["alice@mcie.test", "bob@mcie.test"]
    assert human["sub_edit_pass"] == [True, None]  # sub 2: pass vs fail
    assert any(a["comment"] == "second edit missed" for a in human["annotations"])
    assert human["decided_at"] and human["judge_lean"] == "accept"

    report = status(out_dir, ls_conn, settings)
    assert (report.queued, report.imported, report.annotated, report.decided) == (2, 2, 2, 2)
    assert report.confusion.accept_accept == 1 and report.confusion.reject_accept == 1

    # a third annotator breaks the tie; the re-run decides only that sample
    annotate(ls_conn, task[ids[2]], admin.id, "Reject", ["fail", "fail"])
    result = pull(out_dir, ls_conn, settings)
    assert result.decided_ids == [ids[2]]
    rows = {r["id"]: r for r in read_manifest(out_dir).to_pylist()}
    assert (rows[ids[2]]["verdict"], rows[ids[2]]["verdict_by"]) == ("reject", "human")
    assert ids[2] in dict(iter_tar_groups(out_dir / "shards" / rows[ids[2]]["shard"]))
    assert rows[ids[0]]["verdict"] == "accept"  # earlier decisions untouched

    # nothing left to decide: a further pull changes no byte
    snapshot = {p.name: p.read_bytes() for p in (out_dir / "shards").iterdir()}
    manifest = (out_dir / "manifest.parquet").read_bytes()
    assert pull(out_dir, ls_conn, settings).decided == 0
    assert {p.name: p.read_bytes() for p in (out_dir / "shards").iterdir()} == snapshot
    assert (out_dir / "manifest.parquet").read_bytes() == manifest
    # every sample of the build is in exactly one place
    keys = [k for p in (out_dir / "shards").glob("*.tar") for k, _ in iter_tar_groups(p)]
    assert len(keys) == len(set(keys))
    assert set(queue.review_ids(out_dir)).isdisjoint(keys)


def test_server_killed_mid_push_then_push_again(ls_server, ls_conn, out_dir):  # noqa: F811
    queued = make_build(out_dir, borderline=6)
    settings = _settings("killed-mid-push", batch_size=1)

    def crash(done: int) -> None:
        if done == 2:
            ls_server.kill()

    with pytest.raises(LabelStudioUnavailable):
        push(out_dir, ls_conn, settings, on_batch=crash)
    ls_server.start(timeout_s=120)
    result = push(out_dir, ls_conn, settings)
    assert result.already_imported == 2 and result.imported == 4
    ids = _sample_ids_in_project(ls_conn, "killed-mid-push")
    assert sorted(ids) == sorted(queued)  # nothing missing, no duplicate


def test_wrong_token_is_one_clear_line(ls_server, out_dir):  # noqa: F811
    make_build(out_dir, borderline=1)
    env = dict(os.environ, LABEL_STUDIO_URL=ls_server.url, LABEL_STUDIO_API_KEY="not-a-valid-token")
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "review", "push", str(out_dir), "--project", "wrong-token"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "rejected the API key" in done.stderr and "LABEL_STUDIO_API_KEY" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1

    env["LABEL_STUDIO_URL"] = "http://127.0.0.1:9"  # nothing listens there
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "review", "status", str(out_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0 and "queued:    1" in done.stdout
    assert "cannot reach Label Studio" in done.stdout and "Traceback" not in done.stderr


def test_a_project_made_with_an_older_labeling_config_is_brought_up_to_date(ls_conn, out_dir):  # noqa: F811
    make_build(out_dir, borderline=1)
    settings = _settings("old-config")
    client = connect(ls_conn)
    old = labeling_config().replace("$source_image", "$source").replace("$target_image", "$target")
    created = client.projects.create(title=settings.project, label_config=old,
                                     maximum_annotations=settings.annotations_per_task)
    result = push(out_dir, ls_conn, settings)
    assert result.project_id == created.id and result.imported == 1
    config = client.projects.get(id=created.id).label_config
    assert "$source_image" in config and "$source\"" not in config


def test_corrected_region_and_text(ls_conn, out_dir):  # noqa: F811
    """The labeling config's brush and text controls hold what push pre-fills; a reviewer's
    corrected region and texts (brushlabels in Label Studio's RLE, textareas) reach the shard."""
    import numpy as np
    from label_studio_sdk.converter.brush import mask2rle

    from pipeline import rle
    from pipeline.dataset.shards import decode_regions

    ids = make_build(out_dir, borderline=2)  # ids[0]: 2 sub-edits (recolor, add); ids[1]: 3
    settings = _settings("corrections")
    project_id = push(out_dir, ls_conn, settings).project_id
    client = connect(ls_conn)
    task = _task_of(client, project_id, ids[0])
    (prediction,) = task.predictions
    pred = prediction if isinstance(prediction, dict) else prediction.model_dump()
    prefilled = [r for r in pred["result"] if r["type"] in ("brushlabels", "textarea")]
    assert len(prefilled) == 2 + 3  # two regions; the instruction and two sub-instruction texts

    # the reviewer keeps the prediction, repaints region 2 and rewrites a text (as the UI submits)
    corrected = np.zeros((64, 64), np.uint8)
    corrected[30:52, 8:27] = 255
    corrected[50:60, 40:44] = 255
    result = [r for r in prefilled if r.get("value", {}).get("brushlabels") != ["Region 2"]
              and r["from_name"] != "sub_1_edit"]
    result += [
        {"from_name": "regions", "to_name": "target", "type": "brushlabels", "original_width": 64,
         "original_height": 64, "image_rotation": 0,
         "value": {"format": "rle", "rle": mask2rle(corrected), "brushlabels": ["Region 2"]}},
        {"from_name": "sub_1_edit", "to_name": "target", "type": "textarea",
         "value": {"text": ["turn the square green"]}},
        {"from_name": "verdict", "to_name": "target", "type": "choices", "value": {"choices": ["Accept"]}},
    ]
    client.annotations.create(id=task.id, result=result)
    # the other sample: the form as pre-filled, only a verdict → decided, nothing corrected
    other = _task_of(client, project_id, ids[1])
    other_pred = other.predictions[0] if isinstance(other.predictions[0], dict) else other.predictions[0].model_dump()
    client.annotations.create(id=other.id, result=[r for r in other_pred["result"] if r["type"] != "choices"] + [
        {"from_name": "verdict", "to_name": "target", "type": "choices", "value": {"choices": ["Reject"]}}])

    result = pull(out_dir, ls_conn, settings)
    assert (result.decided, result.corrected) == (2, 1)
    assert result.corrections == {"region": {"add": 1}, "text": {"recolor": 1}}
    rows = {r["id"]: r for r in read_manifest(out_dir).to_pylist()}
    assert rows[ids[0]]["corrected"] and not rows[ids[1]]["corrected"]
    members = dict(iter_tar_groups(out_dir / "shards" / rows[ids[0]]["shard"]))[ids[0]]
    view = json.loads(members["json"])
    assert np.array_equal(decode_regions(members["regions.png"], 2)[1], corrected > 0)  # exactly
    assert np.array_equal(rle.decode(view["sub_edits"][1]["mask_rle"]), corrected > 0)
    assert view["sub_edits"][0]["text"] == "turn the square green" and view["corrected"] is True
    human = member_metadata(members)["human"]
    assert human["corrections"]["regions"] == [1] and human["corrections"]["texts"] == [0]


def test_borderlines_with_unknown_sub_edit_scores_are_pushed_as_not_checked(ls_conn, out_dir):  # noqa: F811
    """An imported pair goes to review with its free-text sub-edits unknown (score None): every
    such borderline reaches Label Studio, shown as "not checked", with no pre-filled pass/fail."""
    queued = make_build(out_dir, borderline=3, unknown=True)
    result = push(out_dir, ls_conn, _settings("unknown-scores"))
    assert (result.queued, result.imported) == (3, 3)
    client = connect(ls_conn)
    for sample_id in queued:
        task = _task_of(client, result.project_id, sample_id)
        (prediction,) = task.predictions
        pred = prediction if isinstance(prediction, dict) else prediction.model_dump()
        names = {r.get("from_name") for r in pred["result"]}
        assert not any(str(n).startswith("sub_") and r.get("type") == "choices"
                       for r in pred["result"] for n in [r.get("from_name")]), pred["result"]
        assert "verdict" in names  # the overall lean is still given
        assert "#1 not checked" in json.dumps(task.data), task.data


# ---- issue 24: photo builds, outputs re-made, push gaps, SIGTERM ---------------------------------

def _mark_unknown(out, sample_id: str, index: int) -> None:
    """Make sub-edit `index` of a queued sample unknown (score None, not passed), as the photo
    judge writes it when pixels cannot tell."""
    path = out / "review" / sample_id / "sample.json"
    view = json.loads(path.read_text())
    record = json.loads(view["record"])
    record["scores"]["sub_edits"][index] = None
    record["scores"]["sub_edit_pass"][index] = False
    view["record"] = json.dumps(record)
    path.write_text(json.dumps(view))


def _meta(out, sample_id):
    from annotation.queue import read_review

    return read_review(out, sample_id).meta


def _annotate(client, task, verdict, subs=(), texts=None):
    """Submit the pre-filled form (regions and texts) with a verdict and pass/fail answers, the
    way the labeling UI does; `texts` replaces sub-instruction texts {n: text}."""
    (prediction,) = task.predictions
    pred = prediction if isinstance(prediction, dict) else prediction.model_dump()
    result = [r for r in pred["result"] if r["type"] in ("brushlabels", "textarea")]
    for n, text in (texts or {}).items():
        result = [r for r in result if r["from_name"] != f"sub_{n}_edit"]
        result.append({"from_name": f"sub_{n}_edit", "to_name": "target", "type": "textarea",
                       "value": {"text": [text]}})
    result.append({"from_name": "verdict", "to_name": "target", "type": "choices",
                   "value": {"choices": [verdict]}})
    for n, answer in enumerate(subs, start=1):
        result.append({"from_name": f"sub_{n}", "to_name": "target", "type": "choices",
                       "value": {"choices": [answer]}})
    client.annotations.create(id=task.id, result=result)


def test_a_photo_build_is_pushed_whole_reviewed_and_the_build_shows_it(ls_conn, out_dir, tmp_path, caplog):  # noqa: F811
    queued = make_photo_build(out_dir, tmp_path / "photos")
    assert len(queued) >= 4, f"the photo build queued only {len(queued)} samples for review"
    metas = {i: _meta(out_dir, i) for i in queued}
    if not any(None in m["scores"]["sub_edits"] for m in metas.values()):
        _mark_unknown(out_dir, queued[-1], 0)  # the judge said "unknown" nowhere this time
        metas[queued[-1]] = _meta(out_dir, queued[-1])
    before = json.loads((out_dir / "stats.json").read_text())["verdicts"]

    result = push(out_dir, ls_conn, _settings("photo-review"))
    assert (result.queued, result.imported, result.failed) == (len(queued), len(queued), {})

    client = connect(ls_conn)
    tasks = {t.data["sample_id"]: t for t in project_tasks(client, result.project_id, True)}
    assert sorted(tasks) == sorted(queued)
    for sample_id, meta in metas.items():
        task = tasks[sample_id]
        pred = task.predictions[0] if isinstance(task.predictions[0], dict) else task.predictions[0].model_dump()
        choices = {r["from_name"] for r in pred["result"] if r["type"] == "choices"}
        brushed = {r["value"]["brushlabels"][0] for r in pred["result"] if r["type"] == "brushlabels"}
        for n, (edit, score) in enumerate(zip(meta["sub_edits"], meta["scores"]["sub_edits"]), start=1):
            if score is None:  # unknown: "not checked", and no pre-filled answer for it
                assert f"#{n} not checked" in task.data["judge_summary"] and f"sub_{n}" not in choices
            # a background region is not painted over the target (the overlay outlines it)
            assert (f"Region {n}" in brushed) == (edit["type"] not in ("background", "global"))
    # the data manager's review tab hides the raw-JSON columns
    views = [v.data for v in client.views.list(project=result.project_id)]
    assert [v["hiddenColumns"] for v in views if v.get("title") == REVIEW_VIEW] == [HIDDEN_COLUMNS]
    assert "tasks:data.sub_1_options" in HIDDEN_COLUMNS["explore"]
    assert "tasks:predictions_results" in HIDDEN_COLUMNS["explore"]

    accepted, rejected, conflicted = queued[0], queued[1], queued[2]
    n_acc = len(metas[accepted]["sub_edits"])
    old_text = metas[accepted]["sub_edits"][0]["text"]
    new_text = "make the whole picture a little warmer"
    _annotate(client, tasks[accepted], "Accept", ["pass"] * n_acc, texts={1: new_text})
    _annotate(client, tasks[rejected], "Reject")
    _annotate(client, tasks[conflicted], "Accept", ["fail"] + ["pass"] * (len(metas[conflicted]["sub_edits"]) - 1))

    with caplog.at_level(logging.WARNING, logger="annotation.sync"):
        pulled = pull(out_dir, ls_conn, _settings("photo-review"))
    assert (pulled.decided, pulled.accepted, pulled.rejected) == (2, 1, 1)
    # "still open" counts every sample left in the queue: the untouched ones too
    assert (pulled.open, pulled.unannotated) == (len(queued) - 2, len(queued) - 3)
    assert pulled.conflicts == {conflicted: [1]}
    assert f"{len(queued) - 2} still open" in pulled.summary()
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert conflicted in warning and metas[conflicted]["sub_edits"][0]["text"] in warning

    rows = {r["id"]: r for r in read_manifest(out_dir).to_pylist()}
    assert rows[accepted]["verdict"] == "accept" and rows[rejected]["verdict"] == "reject"
    assert rows[conflicted]["verdict"] == "borderline"  # accepted with a failed sub-instruction
    # the corrected sub-instruction rewrote the complex instruction, in the shard and the manifest
    members = dict(iter_tar_groups(out_dir / "shards" / rows[accepted]["shard"]))[accepted]
    record = member_metadata(members)
    assert record["sub_edits"][0]["text"] == new_text
    instruction = record["instruction"].lower()  # a sentence start is capitalised
    assert new_text in instruction and old_text.lower() not in instruction
    assert record["human"]["corrections"]["original_texts"]["instruction"] == metas[accepted]["instruction"]
    assert rows[accepted]["instruction"] == record["instruction"]

    # report, stats.json and the card were re-made from the manifest
    stats = json.loads((out_dir / "stats.json").read_text())
    verdicts = Counter(r["verdict"] for r in rows.values())
    assert stats["verdicts"] == dict(verdicts) != before
    assert stats["verdicts"]["borderline"] == len(queued) - 2
    assert (out_dir / "README.md").read_text() == render_card(build_figures(out_dir))
    assert (out_dir / "report.html").read_text() == render_report(out_dir)
    assert pulled.report and pulled.report.endswith("report.html")


def test_a_push_that_leaves_a_sample_out_fails_with_the_count_and_reason(ls_server, out_dir):  # noqa: F811
    queued = make_build(out_dir, borderline=3)
    (out_dir / "review" / queued[1] / "target.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    env = dict(os.environ, LABEL_STUDIO_URL=ls_server.url, LABEL_STUDIO_API_KEY=ls_server.config.token,
               LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(TMP_ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "review", "push", str(out_dir), "--project", "push-gap"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "2 imported, 1 failed" in done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr
    assert "1 of 3 queued samples could not be pushed" in errors[0] and queued[1] in errors[0]


def _copy_database(source_dir, target_dir) -> None:
    """A consistent copy of a running server's SQLite database: a new server on it starts in
    seconds (no migrations)."""
    target_dir.mkdir(parents=True)
    with sqlite3.connect(source_dir / "label_studio.sqlite3") as src, \
            sqlite3.connect(target_dir / "label_studio.sqlite3") as dst:
        src.backup(dst)


def test_sigterm_to_labelstudio_serve_stops_the_server_it_started(ls_server, tmp_path):  # noqa: F811
    data = TMP_ROOT / f"ls-serve-{os.getpid()}-{time.monotonic_ns()}"
    _copy_database(ls_server.config.data_dir, data)
    port = free_port()
    env = dict(os.environ, LABEL_STUDIO_USERNAME=ls_server.config.username,
               LABEL_STUDIO_PASSWORD=ls_server.config.password, LABEL_STUDIO_USER_TOKEN=ls_server.config.token)
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "labelstudio", "serve", "--port", str(port), "--data-dir", str(data),
         "--document-root", str(tmp_path / "files")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            pytest.fail("mcie labelstudio serve did not bring a server up")
        # the server runs in its own session, under the mcie process
        server_pids = sorted({p for c in _children(proc.pid) for p in [c, *session_processes(c)]})
        assert server_pids, "no label-studio process under mcie labelstudio serve"

        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, output
        assert "Label Studio stopped (SIGTERM)" in output
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        left = [p for p in server_pids if _alive(p)]
        assert not left, f"label-studio processes still running after SIGTERM: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        import shutil

        shutil.rmtree(data, ignore_errors=True)


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---- issue 25: a malformed annotation costs one warning; credentials are never stored ---------

def _brush_result(label: int, rle: list[int], height: int, width: int) -> dict:
    return {"from_name": "regions", "to_name": "target", "type": "brushlabels", "original_width": width,
            "original_height": height, "image_rotation": 0,
            "value": {"format": "rle", "rle": rle, "brushlabels": [f"Region {label}"]}}


def _verdict(choice: str) -> dict:
    return {"from_name": "verdict", "to_name": "target", "type": "choices", "value": {"choices": [choice]}}


def test_a_malformed_annotation_costs_one_warning_and_every_good_one_is_decided(ls_conn, out_dir, caplog):  # noqa: F811
    """Among good annotations: a region of another size than the image, a region declaring an
    8000 x 8000 image (never decoded at that size), a text for a sub-instruction past the
    sample's (the task's count edited in Label Studio). Each costs one warning naming its sample,
    which stays queued; the good ones are decided; a second pull goes through the same way."""
    import numpy as np

    from annotation import brush

    ids = make_build(out_dir, borderline=5)  # 2, 3, 4, 2, 3 sub-edits, 64 x 64
    settings = _settings("malformed")
    project_id = push(out_dir, ls_conn, settings).project_id
    client = connect(ls_conn)
    tasks = {i: _task_of(client, project_id, i) for i in ids}
    _annotate(client, tasks[ids[0]], "Accept")
    _annotate(client, tasks[ids[3]], "Reject")
    small = np.zeros((32, 32), bool)
    small[2:9, 2:9] = True
    client.annotations.create(id=tasks[ids[1]].id, result=[_brush_result(1, brush.encode(small), 32, 32),
                                                          _verdict("Accept")])
    count = 8000 * 8000 * 4
    huge = [(count >> s) & 255 for s in (24, 16, 8, 0)] + [0x3F] * 60_000
    client.annotations.create(id=tasks[ids[2]].id, result=[_brush_result(2, huge, 8000, 8000), _verdict("Reject")])
    edited = tasks[ids[4]]
    client.tasks.update(id=edited.id, data={**edited.data, "num_sub_instructions": 6})
    client.annotations.create(id=edited.id, result=[
        {"from_name": "sub_5_edit", "to_name": "target", "type": "textarea", "value": {"text": ["make it pink"]}},
        _verdict("Reject")])

    malformed = {ids[1]: "declared 32x32, the image is 64x64", ids[2]: "declared 8000x8000, the image is 64x64",
                 ids[4]: "sub-instruction 5, the sample has 3"}
    for attempt in (1, 2):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            result = pull(out_dir, ls_conn, settings)
        expected_decided = 2 if attempt == 1 else 0
        assert (result.decided, result.open) == (expected_decided, 3), result.summary()
        assert set(result.malformed) == set(malformed)
        for sample_id, why in malformed.items():
            lines = [r.getMessage() for r in caplog.records if sample_id in r.getMessage()]
            assert len(lines) == 1 and why in lines[0], lines
    assert sorted(result.malformed) == sorted(queue.review_ids(out_dir))  # still queued, nothing moved
    rows = {r["id"]: r for r in read_manifest(out_dir).to_pylist()}
    assert (rows[ids[0]]["verdict"], rows[ids[3]]["verdict"]) == ("accept", "reject")


def test_credentials_in_the_label_studio_url_are_never_stored_or_printed(ls_server, ls_conn, out_dir, capsys):  # noqa: F811
    """`http://user:password@host`: the credentials are stripped on construction (Label Studio
    authenticates with the API key; httpx would send them as a basic-auth header replacing it),
    so the pull works, and the shard's `human.server` and every message name the server
    without them."""
    from urllib.parse import quote

    from annotation.client import Connection

    ids = make_build(out_dir, borderline=1)
    settings = _settings("credentials")
    project_id = push(out_dir, ls_conn, settings).project_id
    client = connect(ls_conn)
    _annotate(client, _task_of(client, project_id, ids[0]), "Accept")
    secret = ls_server.config.password
    url = ls_conn.url.replace("http://", f"http://{quote(ls_server.config.username)}:{secret}@")
    result = pull(out_dir, Connection(url=url, api_key=ls_conn.api_key), settings)
    assert result.decided == 1
    row = {r["id"]: r for r in read_manifest(out_dir).to_pylist()}[ids[0]]
    members = dict(iter_tar_groups(out_dir / "shards" / row["shard"]))[ids[0]]
    human = member_metadata(members)["human"]
    assert human["server"] == ls_conn.url and secret not in json.dumps(human)
    down = Connection(url=f"http://user:{secret}@127.0.0.1:{free_port()}", api_key="k", deadline_s=5)
    from annotation.client import LabelStudioError

    with pytest.raises(LabelStudioError) as caught:
        pull(out_dir, down, settings)
    assert secret not in str(caught.value) and "127.0.0.1" in str(caught.value)
