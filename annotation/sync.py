"""push / pull / status between a build's review queue and a Label Studio project.

- `push(out)`: find the project by title (create it if missing), make the images reachable,
  import every queued sample the project does not hold yet. Idempotent: the project's tasks are
  listed first and matched by `data.sample_id`, so a second push, or a push after a crash (even one
  that lost the answer to an import that the server did commit), imports nothing twice.
- `pull(out)`: read the annotations, apply the `AgreementPolicy`, apply the reviewer's corrected
  regions and texts (`annotation.corrections`; taken from the latest counted vote that agrees with
  the decision and changes something), and move each decided sample into the train / negatives
  shards and the manifest (`annotation.queue.commit_decision`).
- `status(out)`: queued / imported / annotated / decided counts, judge-vs-human agreement.

Accepted with a failed sub-instruction: when the majority accepts a sample but also marks one of
its sub-instructions failed, the two answers contradict each other (an accepted pair's every
sub-edit is carried out). The sample is not decided: it stays borderline in the queue, the pull
warns naming the sample and the sub-instruction, and counts it open; the reviewer settles it in
Label Studio (marks the sub-instruction pass, after correcting its text or region if that was what
was wrong, or rejects the pair) and pulls again.

A malformed annotation costs one warning, never the pull: a region of another size than the
sample's image (a brush RLE is decoded at the sample's size only: the size an annotation declares
never decides what is allocated), a sub-instruction the sample does not have, a damaged RLE
(`annotation.corrections.MalformedCorrection`). The warning names the sample and the reason; the
sample stays queued, undecided (`PullResult.malformed`), and every other sample is decided. Fix or
delete that annotation in Label Studio and pull again.

The server's URL is stored in a decision (`human.server`) and printed without credentials
(`annotation.client.Connection` strips a `user:password@` on construction).

After a pull that decided anything, report.html, stats.json and the dataset card (README.md) are
re-made from the manifest (`pipeline.dataset.report.write_report`), so they show the new counts.

`verdict_by` of a human decision: "both" when the humans' verdict equals the judge's lean (overall
score >= `lean_threshold` leans accept), "human" when it overrides it.

OUT on an object store (`s3://bucket/out`, `pipeline.storage`): the images go inline (data URLs
read from the bucket by push), so the server needs neither the bucket's credentials nor URLs that
expire; `--images local-files` is refused with one line. Pull moves decided samples between the
bucket's prefixes as it does between folders.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from annotation.agreement import AgreementPolicy, Confusion, majority_pass
from annotation.client import (
    Connection,
    LabelStudioError,
    connect,
    list_pages,
    translated_errors,
)
from annotation.corrections import MalformedCorrection, apply_proposal, tally
from annotation.queue import commit_decision, read_review, read_rows, review_ids, sync_lock
from annotation.tasks import (
    MAX_SUB_INSTRUCTIONS,
    ImageRef,
    Vote,
    build_task,
    counted_votes,
    data_url,
    judge_lean,
    labeling_config,
    local_files_url,
    parse_annotation,
)
from pipeline import storage
from pipeline.dataset.move import is_sample_id
from pipeline.dataset.output import MANIFEST
from pipeline.dataset.shards import atomic_write_bytes
from pipeline.sources.decode import DECODE_ERRORS

log = logging.getLogger(__name__)

IMAGE_MODES = ("auto", "local-files", "inline")
DOCUMENT_ROOT_ENV = "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"
TITLE_MAX = 50  # Label Studio's limit on project titles
PAGE_SIZE = 100


@dataclass(frozen=True)
class ReviewSettings:
    """How push/pull behave. `project`: project title (default `mcie review <OUT dir name>`).
    `image_mode`: "local-files" (server reads OUT from the same disk: needs `document_root`, the
    server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, above OUT), "inline" (base64 data URLs in the
    task, works with any server), "auto" (local-files when the server is on this machine and OUT
    is under the document root, else inline)."""

    project: str | None = None
    image_mode: str = "auto"
    document_root: Path | None = None
    annotations_per_task: int = 1
    batch_size: int = 20
    lean_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.image_mode not in IMAGE_MODES:
            raise ValueError(f"image mode must be one of {IMAGE_MODES}, got {self.image_mode!r}")
        if self.project is not None and not 0 < len(self.project) <= TITLE_MAX:
            raise ValueError(f"project title must have 1..{TITLE_MAX} characters, got {self.project!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be positive, got {self.batch_size}")
        if not 0.0 <= self.lean_threshold <= 1.0:
            raise ValueError(f"lean threshold must be within 0..1, got {self.lean_threshold}")
        AgreementPolicy(self.annotations_per_task)  # validates

    def title(self, out: Path) -> str:
        where = storage.location(out)
        name = where.resolve().name if storage.is_local(where) else where.name
        return self.project or f"mcie review {name}"[:TITLE_MAX]

    def root(self) -> Path | None:
        root = self.document_root or os.environ.get(DOCUMENT_ROOT_ENV)
        return Path(root).resolve() if root else None


@dataclass
class PushResult:
    project_id: int
    project: str
    image_mode: str
    queued: int
    already_imported: int
    imported: int
    failed: dict[str, str] = field(default_factory=dict)  # sample id -> why it was not pushed

    def summary(self) -> str:
        return (f"project {self.project!r} (id {self.project_id}, images {self.image_mode}): "
                f"{self.queued} queued, {self.already_imported} already imported, "
                f"{self.imported} imported" + (f", {len(self.failed)} failed" if self.failed else ""))

    def failure(self) -> str | None:
        """One line naming what was not pushed and why (None when everything was): every
        borderline must reach a reviewer, so a caller fails on it."""
        if not self.failed:
            return None
        shown = "; ".join(f"{i}: {why}" for i, why in list(self.failed.items())[:3])
        more = f"; and {len(self.failed) - 3} more" if len(self.failed) > 3 else ""
        return (f"{len(self.failed)} of {self.queued} queued samples could not be pushed "
                f"({shown}{more})")


@dataclass
class PullResult:
    project_id: int | None
    decided: int = 0
    accepted: int = 0
    rejected: int = 0
    open: int = 0  # still in the queue after this pull: untouched, too few votes, a tie, a conflict
    ties: int = 0
    unannotated: int = 0  # no counted vote yet
    # accepted by the majority although it failed a sub-instruction: left open (ACCEPT_WITH_FAILED)
    conflicts: dict[str, list[int]] = field(default_factory=dict)
    report: str | None = None  # report.html, re-made with stats.json and the card after decisions
    decided_ids: list[str] = field(default_factory=list)
    corrected: int = 0  # decided samples a human corrected (a region or a text)
    # {"region"|"text": {edit type ("instruction" for the complex instruction): count}}
    corrections: dict[str, dict[str, int]] = field(default_factory=lambda: {"region": {}, "text": {}})
    # sample id -> why its annotation could not be applied (one warning each; left open)
    malformed: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{self.decided} decided ({self.accepted} accept, {self.rejected} reject), "
                 f"{self.open} still open ({self.unannotated} not annotated, {self.ties} ties, "
                 f"{len(self.conflicts)} accepted with a failed sub-instruction"
                 + (f", {len(self.malformed)} with a malformed annotation" if self.malformed else "") + ")"]
        for kind in ("region", "text"):
            counts = self.corrections.get(kind) or {}
            detail = ", ".join(f"{t} {n}" for t, n in counts.items())
            parts.append(f"{kind}s corrected: {sum(counts.values())}" + (f" ({detail})" if detail else ""))
        remade = "; report.html, stats.json and README.md re-made" if self.report else ""
        return f"{parts[0]}; {self.corrected} corrected by a human; " + "; ".join(parts[1:]) + remade


@dataclass
class ReviewStatus:
    project: str
    queued: int
    imported: int | None  # None: the server could not be asked (see `server_error`)
    annotated: int | None
    decided: int
    accepted: int
    rejected: int
    confusion: Confusion
    server_error: str | None = None

    def lines(self) -> list[str]:
        kappa = self.confusion.kappa
        agree = self.confusion.observed_agreement
        unknown = "?"
        lines = [
            f"project:   {self.project}",
            f"queued:    {self.queued}   (awaiting a human decision in OUT/review)",
            f"imported:  {unknown if self.imported is None else self.imported}   (queued samples in Label Studio)",
            f"annotated: {unknown if self.annotated is None else self.annotated}   (queued samples with at least one verdict)",
            f"decided:   {self.decided}   (accept {self.accepted}, reject {self.rejected})",
            "judge lean vs human verdict:",
            self.confusion.table(),
            f"agreement: {'n/a' if agree is None else f'{agree:.3f}'}   "
            f"Cohen's kappa: {'n/a' if kappa is None else f'{kappa:.3f}'}",
        ]
        if self.server_error:
            lines.append(f"server: {self.server_error}")
        return lines


# ---- project ----------------------------------------------------------------------------------------

def find_project(client, title: str, conn: Connection | None = None):
    listed = list_pages(client.projects.list(title=title, page_size=PAGE_SIZE), "projects",
                        PAGE_SIZE, _server(conn))
    matches = [p for p in listed if p.title == title]
    if len(matches) > 1:
        log.warning("%d projects titled %r; using the oldest (id %d)", len(matches), title, min(p.id for p in matches))
    return min(matches, key=lambda p: p.id) if matches else None


def ensure_project(client, title: str, settings: ReviewSettings, conn: Connection | None = None):
    project = find_project(client, title, conn)
    if project is None:
        project = client.projects.create(
            title=title,
            label_config=labeling_config(),
            description="Borderline complex-edit pairs from an mcie build: accept or reject.",
            maximum_annotations=settings.annotations_per_task,
            show_collab_predictions=True,
            show_skip_button=True,
        )
        log.info("created Label Studio project %r (id %d)", title, project.id)
        ensure_review_view(client, project.id)
        return project
    changes = {}
    if project.maximum_annotations != settings.annotations_per_task:
        changes["maximum_annotations"] = settings.annotations_per_task
    if _normalised(project.label_config) != _normalised(labeling_config()):
        # A project made by an older version: its config reads task keys new tasks no longer carry.
        changes["label_config"] = labeling_config()
    if changes:
        client.projects.update(id=project.id, **changes)
        log.info("updated Label Studio project %r (id %d): %s", title, project.id, sorted(changes))
    ensure_review_view(client, project.id)
    return project


# The data manager's columns (Label Studio 1.23): a tab made through the API starts with every
# column shown, its raw-JSON ones (prediction and annotation results, the pass/fail option lists)
# included. The review tab shows what a reviewer reads: the instruction, the three images, the
# judge's summary and score, the sample id and the annotation counts.
_BUILTIN = ("id", "inner_id", "completed_at", "total_annotations", "cancelled_annotations",
            "total_predictions", "annotators", "annotations_results", "annotations_ids",
            "predictions_score", "predictions_model_versions", "predictions_results", "file_upload",
            "storage_filename", "created_at", "updated_at", "updated_by", "avg_lead_time", "draft_exists")
_DATA = (("sample_id", "instruction", "source_image", "target_image", "overlay_image", "judge_summary",
          "num_sub_instructions", "sub_more")
         + tuple(f"sub_{n}" for n in range(1, MAX_SUB_INSTRUCTIONS + 1))
         + tuple(f"sub_{n}_options" for n in range(1, MAX_SUB_INSTRUCTIONS + 1)))
SHOWN_COLUMNS = {
    "explore": ("id", "completed_at", "total_annotations", "cancelled_annotations", "annotators",
                "predictions_score", "data.sample_id", "data.instruction", "data.source_image",
                "data.target_image", "data.overlay_image", "data.judge_summary"),
    "labeling": ("id", "total_annotations", "data.instruction"),  # the narrow list beside a task
}
HIDDEN_COLUMNS = {mode: [f"tasks:{c}" for c in _BUILTIN + tuple(f"data.{k}" for k in _DATA) if c not in shown]
                  for mode, shown in SHOWN_COLUMNS.items()}
REVIEW_VIEW = "Review"


def ensure_review_view(client, project_id: int) -> None:
    """The project's data manager tab: without one, Label Studio makes a default tab that shows
    every task data key as a column. Made once; a reviewer's own tabs are left alone. A server
    that refuses it loses a convenience, not the push: a warning."""
    from label_studio_sdk.core.api_error import ApiError

    try:
        views = client.views.list(project=project_id)
        if any((getattr(v, "data", None) or {}).get("title") == REVIEW_VIEW for v in views):
            return
        client.views.create(project=project_id, data={"title": REVIEW_VIEW, "hiddenColumns": HIDDEN_COLUMNS})
    except ApiError as exc:
        log.warning("could not make the data manager tab %r of project %d (%s): its columns stay "
                    "Label Studio's defaults", REVIEW_VIEW, project_id, exc.status_code)


def _normalised(xml: str | None) -> str:
    return " ".join((xml or "").split())


def project_tasks(client, project_id: int, with_annotations: bool,
                  conn: Connection | None = None) -> list[Any]:
    kwargs = {"fields": "all"} if with_annotations else {}
    return list_pages(client.tasks.list(project=project_id, page_size=PAGE_SIZE, **kwargs),
                      "tasks", PAGE_SIZE, _server(conn))


def _server(conn: Connection | None) -> str:
    return f"Label Studio at {conn.url}" if conn else "Label Studio"


def _task_sample_id(task) -> str | None:
    """The task's sample id, or None when it is missing or not an id this factory writes (a task
    edited in Label Studio must not name a path)."""
    data = task.data if isinstance(task.data, dict) else {}
    sample_id = data.get("sample_id")
    if sample_id is None:
        return None
    if not is_sample_id(sample_id):
        log.warning("Label Studio task %s names the sample %r, which no build writes: ignored",
                    getattr(task, "id", "?"), sample_id)
        return None
    return sample_id


# ---- images -----------------------------------------------------------------------------------------

def resolve_image_mode(out: Path, conn: Connection, settings: ReviewSettings) -> str:
    if settings.image_mode != "auto":
        return settings.image_mode
    if not storage.is_local(storage.location(out)):
        return "inline"  # the server cannot read a bucket as local files
    root = settings.root()
    local_host = urlparse(conn.url).hostname in ("127.0.0.1", "localhost", "::1")
    if root is not None and local_host and Path(out).resolve().is_relative_to(root):
        return "local-files"
    return "inline"


def _image_refs(out: Path, settings: ReviewSettings, mode: str) -> Callable[[str], ImageRef]:
    """For each sample id, a function turning (member name, PNG bytes) into a task URL."""
    if mode == "inline":
        return lambda sample_id: (lambda name, png: data_url(png))
    if not storage.is_local(storage.location(out)):
        raise LabelStudioError(f"{storage.show(out)} is on an object store: Label Studio cannot serve it "
                               "as local files; use --images inline")
    root = settings.root()
    if root is None:
        raise LabelStudioError(
            f"image mode local-files needs the server's document root: set {DOCUMENT_ROOT_ENV}"
        )
    if not Path(out).resolve().is_relative_to(root):
        raise LabelStudioError(f"{out} is not under the local-files document root {root}; use --images inline")
    overlays = Path(out) / "annotation" / "overlays"

    def for_sample(sample_id: str) -> ImageRef:
        def ref(name: str, png: bytes) -> str:
            if name == "overlay":  # derived image: written beside the queue, in our own folder
                overlays.mkdir(parents=True, exist_ok=True)
                path = overlays / f"{sample_id}.png"
                atomic_write_bytes(path, png)
            else:
                path = Path(out) / "review" / sample_id / f"{name}.png"
            return local_files_url(path, root)

        return ref

    return for_sample


def _ensure_local_storage(client, project_id: int, out: Path) -> None:
    """Label Studio serves /data/local-files/ only under a local storage of the project. It is
    never synced: push imports the tasks itself."""
    path = str(Path(out).resolve())
    existing = client.import_storage.local.list(project=project_id)
    if any(getattr(s, "path", None) == path for s in existing):
        return
    client.import_storage.local.create(
        project=project_id, path=path, use_blob_urls=True, title="mcie build output"
    )


# ---- push -------------------------------------------------------------------------------------------

def push(
    out: Path | str,
    connection: Connection | None = None,
    settings: ReviewSettings | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> PushResult:
    """Import every queued borderline sample of OUT that the project does not hold yet."""
    out = storage.location(out)
    conn = connection or Connection.from_env()
    settings = settings or ReviewSettings()
    with sync_lock(out):
        client = connect(conn)
        title = settings.title(out)
        mode = resolve_image_mode(out, conn, settings)
        with translated_errors(conn):
            project = ensure_project(client, title, settings, conn)
            if mode == "local-files":
                _ensure_local_storage(client, project.id, out)
            present = {_task_sample_id(t) for t in project_tasks(client, project.id, False, conn)}
            queued = review_ids(out)
            missing = [i for i in queued if i not in present]
            refs = _image_refs(out, settings, mode)
            imported = 0
            failed: dict[str, str] = {}
            for start in range(0, len(missing), settings.batch_size):
                batch = []
                for sample_id in missing[start:start + settings.batch_size]:
                    try:
                        item = read_review(out, sample_id)
                        batch.append(build_task(item.meta, item.members, refs(sample_id), settings.lean_threshold))
                    except DECODE_ERRORS as exc:  # one bad dir (or PNG) must not stop the rest
                        log.warning("review sample %s cannot be pushed: %s", sample_id, exc)
                        failed[sample_id] = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
                if batch:
                    client.projects.import_tasks(id=project.id, request=batch, return_task_ids=True)
                    imported += len(batch)
                if on_batch is not None:
                    on_batch(imported)
    log.info("push %s -> %r: %d queued, %d already there, %d imported, %d failed", out, title,
             len(queued), len(queued) - len(missing), imported, len(failed))
    return PushResult(project.id, title, mode, len(queued), len(queued) - len(missing), imported, failed)


# ---- pull -------------------------------------------------------------------------------------------

def collect_votes(tasks: list[Any]) -> dict[str, list[Vote]]:
    """Votes per sample id over all tasks (duplicates of a sample included), one per annotator."""
    votes: dict[str, list[Vote]] = {}
    for task in tasks:
        sample_id = _task_sample_id(task)
        if not sample_id:
            continue
        try:  # what Label Studio holds was typed by people: garbage costs one line, not the pull
            num_sub = int(task.data.get("num_sub_instructions") or 0)
            parsed = []
            for annotation in task.annotations or []:
                raw = annotation if isinstance(annotation, dict) else annotation.model_dump()
                parsed.append(parse_annotation(raw, task.id, num_sub))
        except (AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:
            log.warning("Label Studio task %s (sample %s) is malformed, its annotations are "
                        "ignored: %s: %s", task.id, sample_id, type(exc).__name__, exc)
            continue
        for vote in parsed:
            if vote is not None:
                votes.setdefault(sample_id, []).append(vote)
    return {sample_id: counted_votes(v) for sample_id, v in votes.items()}


def human_record(votes: list[Vote], verdict: str, lean: str | None, policy: AgreementPolicy,
                 users: dict[int, str], project: str, url: str) -> dict[str, Any]:
    num_sub = max((len(v.sub_edits) for v in votes), default=0)
    return {
        "verdict": verdict,
        "votes": {"accept": sum(v.verdict == "accept" for v in votes),
                  "reject": sum(v.verdict == "reject" for v in votes)},
        "annotations_per_task": policy.annotations_per_task,
        "judge_lean": lean,
        # majority pass/fail per sub-instruction (None: tie or unanswered)
        "sub_edit_pass": [majority_pass(v.sub_edits[i] for v in votes if i < len(v.sub_edits))
                          for i in range(num_sub)],
        "annotations": [
            {
                "annotator": users.get(v.annotator, str(v.annotator)),
                "annotator_id": v.annotator,
                "annotation_id": v.annotation_id,
                "task_id": v.task_id,
                "verdict": v.verdict,
                "sub_edit_pass": list(v.sub_edits),
                "comment": v.comment,
                "created_at": v.created_at,
                "updated_at": v.updated_at,
            }
            for v in votes
        ],
        "decided_at": max(v.updated_at for v in votes),
        "project": project,
        "server": url,
    }


def pull(
    out: Path | str,
    connection: Connection | None = None,
    settings: ReviewSettings | None = None,
) -> PullResult:
    """Decide every queued sample whose annotations satisfy the agreement policy, and move it into
    the shards and the manifest."""
    out = storage.location(out)
    conn = connection or Connection.from_env()
    settings = settings or ReviewSettings()
    policy = AgreementPolicy(settings.annotations_per_task)
    with sync_lock(out):
        client = connect(conn)
        title = settings.title(out)
        with translated_errors(conn):
            project = find_project(client, title, conn)
            if project is None:
                log.info("no Label Studio project %r yet: nothing to pull", title)
                waiting = len(review_ids(out))
                return PullResult(project_id=None, open=waiting, unannotated=waiting)
            votes = collect_votes(project_tasks(client, project.id, True, conn))
            users = {u.id: u.email for u in client.users.list()}
        result = PullResult(project_id=project.id)
        queued = review_ids(out)
        for sample_id in queued:
            sample_votes = votes.get(sample_id)
            if not sample_votes:
                result.unannotated += 1
                continue
            verdict = policy.decide([v.verdict for v in sample_votes])
            if verdict is None:
                accepts = sum(v.verdict == "accept" for v in sample_votes)
                result.ties += len(sample_votes) >= policy.annotations_per_task and 2 * accepts == len(sample_votes)
                continue
            failed = _failed_sub_instructions(sample_votes) if verdict == "accept" else []
            if failed:
                result.conflicts[sample_id] = failed
                _warn_conflict(out, sample_id, failed)
                continue
            item = read_review(out, sample_id)
            lean = judge_lean(item.meta.get("scores") or {}, settings.lean_threshold)
            verdict_by = "both" if verdict == lean else "human"
            human = human_record(sample_votes, verdict, lean, policy, users, title, conn.url)
            changes: list[tuple[str, str]] = []
            agreeing = [v for v in reversed(sample_votes) if v.verdict == verdict and v.proposal]
            try:  # corrections are applied (and refused) before anything is moved
                commit_decision(out, item, verdict, verdict_by, human,
                                corrections=lambda sample: changes.extend(_correct(sample, agreeing)))
            except MalformedCorrection as exc:
                result.malformed[sample_id] = str(exc)
                log.warning("sample %s stays undecided: its annotation cannot apply: %s (fix or "
                            "delete that annotation in Label Studio and pull again)", sample_id, exc)
                continue
            if changes:
                result.corrected += 1
                for kind, counts in tally(changes).items():
                    for edit_type, n in counts.items():
                        result.corrections[kind][edit_type] = result.corrections[kind].get(edit_type, 0) + n
            result.decided += 1
            result.accepted += verdict == "accept"
            result.rejected += verdict == "reject"
            result.decided_ids.append(sample_id)
        result.open = len(queued) - result.decided
        if result.decided and (out / MANIFEST).is_file():
            from pipeline.dataset.report import write_report  # heavy (figures): only when needed

            result.report = str(write_report(out))
    log.info("pull %s <- %r: %s", out, title, result.summary())
    return result


def _failed_sub_instructions(votes: list[Vote]) -> list[int]:
    """1-based numbers of the sub-instructions the majority of `votes` marked failed."""
    num_sub = max((len(v.sub_edits) for v in votes), default=0)
    return [i + 1 for i in range(num_sub)
            if majority_pass(v.sub_edits[i] for v in votes if i < len(v.sub_edits)) is False]


def _warn_conflict(out: Path, sample_id: str, failed: list[int]) -> None:
    try:
        subs = read_review(out, sample_id).meta.get("sub_edits") or []
    except DECODE_ERRORS:
        subs = []
    named = "; ".join(f"#{n} {subs[n - 1].get('text', '')!r}" if n <= len(subs) else f"#{n}" for n in failed)
    log.warning("sample %s was accepted but its sub-instruction %s was marked failed: it stays "
                "borderline; in Label Studio mark it pass (correcting it if needed) or reject the pair, and pull again",
                sample_id, named)


def _correct(sample, votes: list[Vote]) -> list[tuple[str, str]]:
    """Apply the first of `votes` (latest first) whose regions or texts differ from the sample.
    Each vote hands back the whole pre-filled form, so one that changed nothing is skipped rather
    than letting it hide an earlier reviewer's correction."""
    for vote in votes:
        if apply_proposal(copy.deepcopy(sample), vote.proposal, vote.annotation_id).changes:
            return apply_proposal(sample, vote.proposal, vote.annotation_id).changes
    return []


# ---- status -----------------------------------------------------------------------------------------

def human_decisions(out: Path) -> list[tuple[str, str]]:
    """(judge lean, human verdict) of every human-decided manifest row. The lean follows from
    verdict_by: "both" means the humans agreed with it, "human" that they overrode it."""
    pairs = []
    for row in read_rows(out):
        if row.get("verdict_by") in ("human", "both") and row.get("verdict") in ("accept", "reject"):
            human = row["verdict"]
            flipped = "reject" if human == "accept" else "accept"
            pairs.append((human if row["verdict_by"] == "both" else flipped, human))
    return pairs


def status(
    out: Path | str,
    connection: Connection | None = None,
    settings: ReviewSettings | None = None,
) -> ReviewStatus:
    out = storage.location(out)
    conn = connection or Connection.from_env()
    settings = settings or ReviewSettings()
    title = settings.title(out)
    queued = review_ids(out)
    pairs = human_decisions(out)
    report = ReviewStatus(
        project=title, queued=len(queued), imported=None, annotated=None,
        decided=len(pairs), accepted=sum(h == "accept" for _, h in pairs),
        rejected=sum(h == "reject" for _, h in pairs), confusion=Confusion.of(pairs),
    )
    try:
        client = connect(conn)
        with translated_errors(conn):
            project = find_project(client, title, conn)
            tasks = project_tasks(client, project.id, True, conn) if project else []
    except LabelStudioError as exc:
        report.server_error = str(exc)
        return report
    waiting = set(queued)
    in_project = {_task_sample_id(t) for t in tasks}
    votes = collect_votes(tasks)
    report.imported = len(waiting & in_project)
    report.annotated = sum(1 for i in waiting if votes.get(i))
    return report
