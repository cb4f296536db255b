"""Prefect artifacts of the flows: the numbers a person looks at in the UI after a run.

Every flow run publishes its figures the same way: a markdown summary, tables, and a link to
OUT/report.html (the self-contained report; a `file://` link, since the report lives beside the
data). Artifact keys are per purpose (`build-summary`, `build-verdicts`, ...) so the UI shows
their history across runs.
"""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from pipeline.record import EDIT_TYPES, VERDICTS
from pipeline.dataset.stats import BuildStats


def verdict_table(stats: BuildStats) -> list[dict[str, Any]]:
    rows = [{"verdict": v, "samples": stats.verdicts[v],
             "share": round(stats.verdicts[v] / stats.samples, 4) if stats.samples else 0.0}
            for v in VERDICTS if stats.verdicts[v]]
    rows.append({"verdict": "total", "samples": stats.samples, "share": 1.0})
    rows.append({"verdict": "accept rate", "samples": stats.verdicts["accept"],
                 "share": round(stats.accept_rate, 4)})
    return rows


def edit_type_table(stats: BuildStats) -> list[dict[str, Any]]:
    return [{"edit type": t, "sub-edits": stats.sub_edits[t], "passed": stats.sub_edit_passes[t],
             "pass rate": round(stats.pass_rate(t) or 0.0, 4)}
            for t in EDIT_TYPES if stats.sub_edits[t]]


def model_row(stats: dict[str, Any]) -> dict[str, Any]:
    return {"model": stats["model"], "batches": stats["calls"], "frames": stats["frames"],
            "busy s": stats["busy_seconds"], "up s": stats["up_seconds"],
            "busy share": stats["busy_share"], "queue depth mean": stats["queue_depth_mean"],
            "queue depth max": stats["queue_depth_max"]}


def publish_build_artifacts(run: dict[str, Any]) -> None:
    stats = BuildStats.from_dict(run["totals"])
    this_run = run.get("this_run") or {}
    create_markdown_artifact(
        key="build-summary",
        markdown=f"## Build `{run['out']}`\n\n```\n{run['summary']}\n```\n\n"
                 f"Report: `{run['report']}`\n",
        description="counts per verdict, accept rate, per-edit-type pass rates, throughput",
    )
    create_table_artifact(key="build-verdicts", table=verdict_table(stats),
                          description="samples per verdict and the accept rate")
    if stats.sub_edits:
        create_table_artifact(key="build-edit-types", table=edit_type_table(stats),
                              description="sub-edits judged carried out, per edit type")
    reasons = [{"samples": n, "reason": r} for r, n in stats.quarantine_reasons.most_common()]
    create_table_artifact(key="build-quarantine", table=reasons or [{"samples": 0, "reason": "none"}],
                          description="why samples were quarantined")
    throughput = [{"units": run["units_processed"], "samples": this_run.get("samples", 0),
                   "seconds": round(this_run.get("wall_seconds", 0.0), 2),
                   "pairs/s": round(this_run["samples"] / this_run["wall_seconds"], 3)
                   if this_run.get("wall_seconds") else 0.0,
                   "ray start-up s": round(this_run.get("ray_start_seconds", 0.0), 2),
                   "workers": this_run.get("workers"), "flow seconds": round(run["flow_seconds"], 2),
                   "already complete": run["already_complete"]}]
    create_table_artifact(key="build-throughput", table=throughput,
                          description="this run: units and samples processed, pairs/s, start-up")
    if this_run.get("models"):  # a generative editor's model actors (flows.execute)
        create_table_artifact(
            key="build-models", table=[model_row(m) for m in this_run["models"]],
            description="model actors: batches served, busy share of their up time, queue depth "
                        "seen by each arriving batch (bounded by the workers)")
    if this_run.get("units_per_node"):
        create_table_artifact(key="build-nodes", description="work units per Ray node",
                              table=[{"node": n, "units": c} for n, c in this_run["units_per_node"].items()])
    create_link_artifact(key="build-report", link=f"file://{run['report']}", link_text="report.html",
                         description="self-contained HTML report: histograms, accept rates, contact sheet")
