"""The review-sync flow: push a build's borderline queue to Label Studio, pull the human verdicts
back into the shards and the manifest, refresh the report, publish the counts. A queued sample
that could not be pushed fails the flow (after the pull), naming it and why.

Label Studio is reached through `annotation.sync` (LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY from
the environment). Push and pull are idempotent, so a task retried after the server was briefly
unreachable (`LabelStudioUnavailable`) neither imports twice nor decides twice; other Label Studio
errors (a bad key, a refused request) are not retried: a retry would not fix them.

OUT may be an object-store URL (`pipeline.storage`): the images then go to Label Studio inline,
and the report's link is the object's URL.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task

from pipeline import storage
from prefect.artifacts import create_link_artifact, create_table_artifact

RETRIES = 3
RETRY_DELAYS_S = [10, 30, 60]


def retry_if_unavailable(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry only when the server could not be reached."""
    from annotation.client import LabelStudioUnavailable

    try:
        state.result()
    except LabelStudioUnavailable:
        return True
    except Exception:  # any other failure is final: a retry would not fix it
        return False
    return False


def settings_for(project: str | None, image_mode: str, annotations_per_task: int):
    from annotation.sync import ReviewSettings

    return ReviewSettings(project=project, image_mode=image_mode,
                          annotations_per_task=annotations_per_task)


@task(name="review-push", retries=RETRIES, retry_delay_seconds=RETRY_DELAYS_S,
      retry_condition_fn=retry_if_unavailable)
def push_queue(out: str, project: str | None, image_mode: str, annotations_per_task: int) -> dict[str, Any]:
    from annotation.sync import push

    return asdict(push(out, settings=settings_for(project, image_mode, annotations_per_task)))


@task(name="review-pull", retries=RETRIES, retry_delay_seconds=RETRY_DELAYS_S,
      retry_condition_fn=retry_if_unavailable)
def pull_verdicts(out: str, project: str | None, image_mode: str, annotations_per_task: int) -> dict[str, Any]:
    from annotation.sync import pull

    return asdict(pull(out, settings=settings_for(project, image_mode, annotations_per_task)))


@task(name="write-report")
def refresh_report(out: str) -> str:
    from pipeline.dataset.report import write_report

    return report_link(write_report(storage.location(out)))


def report_link(path) -> str:
    """Where the report opens: a local file's absolute path, an object's URL."""
    return str(path.resolve()) if storage.is_local(path) else storage.show(path)


@flow(name="review-sync", log_prints=True)
def review_sync(
    out: str,
    project: str | None = None,
    image_mode: str = "auto",
    annotations_per_task: int = 1,
) -> dict[str, Any]:
    """Push OUT's review queue to Label Studio and pull the decided verdicts back into OUT."""
    logger = get_run_logger()
    where = storage.location(out)
    if not where.is_dir():
        raise FileNotFoundError(f"{out} is not a build directory")
    settings_for(project, image_mode, annotations_per_task)  # validate before touching the server
    pushed = push_queue(out, project, image_mode, annotations_per_task)
    pulled = pull_verdicts(out, project, image_mode, annotations_per_task)
    logger.info("pushed %d new of %d queued; decided %d (%d accept, %d reject), %d open",
                pushed["imported"], pushed["queued"], pulled["decided"], pulled["accepted"],
                pulled["rejected"], pulled["open"])
    # pull re-makes report, stats.json and card when it decided something; else refresh the report
    report = pulled["report"] or (refresh_report(out) if (where / "manifest.parquet").is_file() else None)
    create_table_artifact(
        key="review-sync",
        table=[{"project": pushed["project"], "queued": pushed["queued"], "imported now": pushed["imported"],
                "decided now": pulled["decided"], "accepted": pulled["accepted"],
                "rejected": pulled["rejected"], "open": pulled["open"], "ties": pulled["ties"],
                "malformed": len(pulled["malformed"])}],
        description="borderline samples pushed to Label Studio and human verdicts pulled back",
    )
    if report:
        link = report if storage.is_url(report) else f"file://{report}"
        create_link_artifact(key="build-report", link=link, link_text="report.html",
                             description="the build's report, refreshed after the human verdicts")
    if pushed["failed"]:  # every borderline must reach a reviewer: the flow fails, with the reasons
        from annotation.sync import PushResult

        raise RuntimeError(PushResult(**pushed).failure())
    return {"push": pushed, "pull": pulled, "report": report}
