"""`mcie eval`: score an editor's outputs on CIE-Bench and write the report.

Two kinds of editor:
- `--predictions DIR`: another system's outputs, one image per case at `DIR/{case_id}.png` (any
  format Pillow reads under that name; RGBA and grey are converted to RGB). A missing or unreadable
  file makes that case a failed case, listed in the report with its reason.
- `--checkpoint CKPT`: an MCIE-E1 checkpoint, run on every case's source and instruction through
  `load_checkpoint_editor` (the adapter to `trainer`'s inference API); its outputs are saved as
  `REPORT/predictions/{case_id}.png` (re-scorable with `--predictions`), then scored the same way.
  A case the model fails on is a failed case, not a crash.

Figures and their definitions: `pipeline.ciebench.metrics`; files: `trainer.eval_report`.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from pipeline import cli_args
from pipeline.ciebench.cases import BenchError, case_ids, iter_bench, read_index
from pipeline.judges.base import make_judge
from pipeline.ciebench.metrics import PredictionError, score_cases, summarize
from pipeline.record import EditSample
from pipeline.routing import RoutingPolicy
from pipeline.dataset.shards import atomic_write_bytes, encode_png
from trainer.predictions import prediction_path, read_prediction

log = logging.getLogger(__name__)

PREDICTIONS_DIR = "predictions"

Editor = Callable[[np.ndarray, str], np.ndarray]


class EvalError(ValueError):
    """An evaluation that cannot run at all (bad arguments, no such directory, bad checkpoint)."""


# ---- predictions ---------------------------------------------------------------------------------

def directory_predictions(directory: Path, ids: Iterable[str]) -> Iterator[np.ndarray | PredictionError]:
    for cid in ids:
        yield read_prediction(prediction_path(directory, cid))


def load_checkpoint_editor(checkpoint: Path, device: str | None = None, steps: int = 20,
                           seed: int = 0, dtype: str = "auto", offload: bool | None = None) -> Editor:
    """Adapter to the trainer's inference API (`trainer.edit.load_model` / `edit_image`): a
    function (source image, instruction) -> edited image. Regions are the model's own
    predictions: the benchmark gives an editor only what a user would (image and instruction).
    `dtype`, `offload`: as `mcie edit` (`trainer.edit.load_model`)."""
    try:
        import torch
        from trainer.edit import edit_image, load_model
    except ImportError as exc:
        raise EvalError(f"the MCIE-E1 inference API is not available ({exc})") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = load_model(Path(checkpoint), device, dtype=dtype, offload=offload)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # missing files, bad config/weights
        raise EvalError(f"cannot load checkpoint {checkpoint}: {type(exc).__name__}: {exc}") from None

    def edit(image: np.ndarray, instruction: str) -> np.ndarray:
        result, _ = edit_image(model, Image.fromarray(image, "RGB"), instruction, steps=steps, seed=seed)
        return np.asarray(result.convert("RGB"))

    return edit


def run_editor(editor: Editor, cases: Iterable[EditSample], out: Path) -> Path:
    """Run `editor` on every case and save its outputs as `out/{case_id}.png`. A case the editor
    fails on leaves no file (it then scores as a failed case, with the reason logged)."""
    out.mkdir(parents=True, exist_ok=True)
    for case in cases:
        path = prediction_path(out, case.id)
        path.unlink(missing_ok=True)
        try:
            image = np.asarray(editor(case.source.copy(), case.instruction))
            if image.dtype != np.uint8:
                image = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
            atomic_write_bytes(path, encode_png(image))
        except Exception as exc:  # one bad case must not end the run: it scores as failed
            log.warning("editor failed on %s: %s: %s", case.id, type(exc).__name__, exc)
    return out


# ---- the evaluation -------------------------------------------------------------------------------

def _default_out(bench: Path, predictions: str | None, checkpoint: str | None) -> Path:
    name = Path(predictions or checkpoint or "run").resolve().name or "run"
    return Path(bench) / "reports" / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def evaluate(
    bench: Path,
    predictions: str | Path | None = None,
    checkpoint: str | Path | None = None,
    judge: str = "pixel",
    judge_options: dict[str, Any] | None = None,
    out: Path | None = None,
    limit: int | None = None,
    examples: int = 24,
    policy: RoutingPolicy | None = None,
    editor: Editor | None = None,
    checkpoint_options: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], Path]:
    """Score one editor on the benchmark; write REPORT/report.json and report.html.

    Exactly one of `predictions` (a directory), `checkpoint` or `editor` (a function, for tests
    and other in-process editors) names what is scored. Returns (summary, report directory)."""
    from trainer.eval_report import write_report

    if sum(x is not None for x in (predictions, checkpoint, editor)) != 1:
        raise EvalError("give exactly one of --predictions and --checkpoint")
    started = time.perf_counter()
    index = read_index(bench)
    out = Path(out) if out is not None else _default_out(bench, predictions and str(predictions),
                                                          checkpoint and str(checkpoint))
    if predictions is not None and not Path(predictions).is_dir():
        raise EvalError(f"--predictions {predictions} is not a directory")
    try:
        the_judge = make_judge(judge, **(judge_options or {}))
    except (ValueError, TypeError) as exc:
        raise EvalError(f"cannot make judge {judge!r}: {exc}") from None
    policy = policy or RoutingPolicy.for_judge(the_judge)
    ids = case_ids(bench, limit)
    if not ids:
        raise EvalError(f"{bench} holds no cases")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EvalError(f"cannot write the report to {out}: {exc}") from None
    if predictions is None:
        if editor is None:
            editor = load_checkpoint_editor(Path(checkpoint), **(checkpoint_options or {}))
        predictions = run_editor(editor, iter_bench(bench, limit), out / PREDICTIONS_DIR)
    predictions = Path(predictions)
    results = score_cases(iter_bench(bench, limit), directory_predictions(predictions, ids),
                          the_judge, policy)
    summary = summarize(results)
    meta = {
        "bench": str(bench),
        "bench_version": index.get("version"),
        "resolution": index.get("resolution"),
        "predictions": str(predictions),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "judge": f"{the_judge.name}@{the_judge.version}",
        "sub_edit_pass_threshold": policy.sub_edit_pass,
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_report(out, summary, results, Path(bench), predictions, meta, examples)
    return summary, out


# ---- the command ------------------------------------------------------------------------------

def register(subparsers) -> None:
    """`mcie eval ...`."""
    ev = subparsers.add_parser("eval", help="score an editor on CIE-Bench (compliance, consistency)")
    ev.add_argument("--bench", required=True, help="benchmark directory (mcie bench build)")
    what = ev.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="MCIE-E1 checkpoint to run on every case")
    what.add_argument("--predictions", help="directory of another system's outputs: {case_id}.png")
    ev.add_argument("--out", help="report directory (default BENCH/reports/<name>)")
    ev.add_argument("--limit", type=cli_args.positive_int, help="score only the first N cases")
    cli_args.add_judge_arguments(ev)
    ev.add_argument("--examples", type=int, default=24, help="cases shown in the HTML report")
    ev.add_argument("--device", help="--checkpoint: torch device (default cuda if available)")
    ev.add_argument("--steps", type=cli_args.positive_int, default=20, help="--checkpoint: sampling steps")
    ev.add_argument("--seed", type=int, default=0, help="--checkpoint: sampling seed")
    add_inference_arguments(ev)
    ev.set_defaults(func=run_eval)


INFERENCE_DTYPES = ("auto", "float32", "bfloat16", "float16")  # `trainer.edit.inference_dtype`'s names


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """--dtype and --no-offload of `mcie edit` and `mcie eval --checkpoint` (`trainer.edit.load_model`)."""
    parser.add_argument("--dtype", choices=INFERENCE_DTYPES, default="auto",
                        help="the frozen VAE and MLLM and the DiT's base weights (auto: bfloat16 on CUDA, "
                             "the released weights' own; float32 on CPU); MCIE-E1's small trained modules "
                             "stay float32")
    parser.add_argument("--no-offload", dest="offload", action="store_false", default=None,
                        help="keep the MLLM and the denoiser on the device together (default on CUDA: "
                             "each waits on the CPU while the other runs)")


def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 2


def run_eval(args: argparse.Namespace) -> int:
    try:
        options = cli_args.judge_options(args)
    except ValueError as exc:
        return _fail(f"mcie eval: error: {exc}")
    if args.examples < 0:
        return _fail("mcie eval: error: --examples must be >= 0")
    try:
        summary, out = evaluate(
            bench=Path(args.bench), predictions=args.predictions, checkpoint=args.checkpoint,
            judge=args.judge, judge_options=options, out=Path(args.out) if args.out else None,
            limit=args.limit, examples=args.examples,
            checkpoint_options={"device": args.device, "steps": args.steps, "seed": args.seed,
                                "dtype": args.dtype, "offload": args.offload},
        )
    except (BenchError, EvalError) as exc:
        return _fail(f"mcie eval: error: {exc}")
    ic, bc = summary["instruction_compliance"], summary["background_consistency"]
    bc_text = "n/a" if bc is None else f"{bc:.4f}"
    print(f"{summary['cases']} cases ({summary['failed_cases']} failed): "
          f"instruction_compliance {ic:.4f}, background_consistency {bc_text}; report in {out}")
    return 0
