"""Human review against a real Label Studio server (installed into .ls-venv, started on
127.0.0.1 by a session fixture): push, annotate through the REST API as annotators would, pull,
and the failure cases (push twice, server killed mid-push, crash mid-pull, wrong token)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import httpx
import pytest

from annotation import queue
from annotation.client import LabelStudioUnavailable, connect
from annotation.sync import ReviewSettings, find_project, project_tasks, pull, push, status
from annotation.tasks import labeling_config
from labelstudio_fixtures import ROOT, TMP_ROOT, ls_conn, ls_server, make_build, out_dir  # noqa: F401
from pipeline.dataset.output import read_manifest
from pipeline.dataset.shards import checksum, iter_tar_groups, member_metadata

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
