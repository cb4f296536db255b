"""The two CIE-Bench metrics, per case and over a benchmark.

A case is an `EditSample` of the benchmark (source, instruction, sub-edits with their region masks,
background mask, reference target); a prediction is the edited image some system returned for it.

**Instruction Compliance (IC).** The judge (any `pipeline.judges.base` backend, the same as a build uses)
scores the pair (source, prediction) per sub-edit, s_i in [0, 1]. Sub-edit i counts as carried out
when s_i >= tau, tau being the routing policy's sub-edit pass threshold (the bar a build uses to
decide `scores["sub_edit_pass"]`). For a case with n sub-edits

    IC_case = (number of sub-edits carried out) / n,        IC = mean of IC_case over all cases.

Breakdowns: `by_sub_edit_count[n]` is the mean IC_case over the cases with n sub-edits;
`by_edit_type[t]` is the share of all sub-edits of type t (pooled over cases) carried out.

**Background Consistency (BC).** Let B be the case's background mask (pixels outside every sub-edit
region, what must stay unchanged). BC_case is the *masked SSIM* of prediction vs source over B:
the SSIM map (Wang et al. 2004: Gaussian window sigma 1.5 truncated at radius 5, C1 = (0.01*255)^2,
C2 = (0.03*255)^2, per RGB channel) computed with *normalised convolution* restricted to B — every
local mean, variance and covariance is a Gaussian-weighted average over background pixels only —
so pixels inside the edit regions, which are meant to change, never leak into the score. The map
is averaged over the pixels of B and the three channels and clipped to [0, 1].
    BC = mean of BC_case over the cases with a background (B not empty).
A case whose sub-edits cover the whole image (a background change with every object edited) has
nothing that must stay unchanged: its BC_case is undefined (null) and left out of the mean, for
every system alike (it is a property of the case, not of the prediction).
An untouched background scores exactly 1; independent noise scores about 0 (its covariance with
the source is about 0, and flat ground has no variance to share).

**Failed cases.** A case whose prediction is missing, unreadable or not an image scores 0 on both
metrics (BC stays null where the case has no background); a case the judge cannot score
(JudgeError, or a judge that raises) scores 0 compliance and its BC from pixels. Both are listed
with their reason; nothing raises. A prediction of another size than the source is
resized to it (bicubic) and flagged `resized`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np

from pipeline.judges.base import Judge, JudgeError
from pipeline.record import EditSample, JudgeView
from pipeline.routing import RoutingPolicy

log = logging.getLogger(__name__)

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # ~3.5 sigma: the classic 11x11 window
SSIM_C1 = (0.01 * 255) ** 2
SSIM_C2 = (0.03 * 255) ** 2


# ---- Background Consistency --------------------------------------------------------------------

def _gaussian_taps() -> np.ndarray:
    x = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float32)
    taps = np.exp(-(x * x) / (2 * SSIM_SIGMA**2))
    return taps / taps.sum()


_TAPS = _gaussian_taps()


def _blur(stack: np.ndarray) -> np.ndarray:
    """Separable Gaussian blur of (N, H, W) with zero padding (outside the frame has weight 0,
    which normalised convolution divides out)."""
    n, h, w = stack.shape
    r = SSIM_RADIUS
    padded = np.zeros((n, h + 2 * r, w), dtype=stack.dtype)
    padded[:, r : r + h] = stack
    rows = sum(tap * padded[:, k : k + h] for k, tap in enumerate(_TAPS))
    padded = np.zeros((n, h, w + 2 * r), dtype=stack.dtype)
    padded[:, :, r : r + w] = rows
    return sum(tap * padded[:, :, k : k + w] for k, tap in enumerate(_TAPS))


def masked_ssim(source: np.ndarray, prediction: np.ndarray, mask: np.ndarray) -> float | None:
    """Mean SSIM of `prediction` vs `source` over the true pixels of `mask`, local statistics taken
    over `mask` pixels only (normalised convolution), clipped to [0, 1]; None for an empty mask.
    See the module docstring."""
    if source.shape != prediction.shape or source.ndim != 3:
        raise ValueError(f"source {source.shape} and prediction {prediction.shape} must both be HxWx3")
    if mask.shape != source.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match the image {source.shape[:2]}")
    if not mask.any():
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    # Only the mask's bounding box (plus the window) matters: crop to save work.
    y0, y1 = max(0, rows[0] - SSIM_RADIUS), min(mask.shape[0], rows[-1] + 1 + SSIM_RADIUS)
    x0, x1 = max(0, cols[0] - SSIM_RADIUS), min(mask.shape[1], cols[-1] + 1 + SSIM_RADIUS)
    m = mask[y0:y1, x0:x1].astype(np.float32)
    x = np.moveaxis(source[y0:y1, x0:x1].astype(np.float32), -1, 0)
    y = np.moveaxis(prediction[y0:y1, x0:x1].astype(np.float32), -1, 0)
    # Centre both on the source's background mean: SSIM's variance and covariance terms are
    # invariant to it, and float32 moments lose far less to cancellation around 0.
    centre = x[:, mask[y0:y1, x0:x1]].mean(axis=1)[:, None, None]
    x, y = x - centre, y - centre
    weight = _blur(m[None])[0]
    sums = _blur(np.concatenate([m * x, m * y, m * x * x, m * y * y, m * x * y]))
    inside = mask[y0:y1, x0:x1]
    w = weight[inside]  # >= the centre tap on every mask pixel: never 0
    mu_x, mu_y, xx, yy, xy = (s[:, inside] / w for s in np.split(sums, 5))
    # Not clipped at 0: identical images then give cov == var bit for bit, hence exactly 1.
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    mu_x, mu_y = mu_x + centre[:, :, 0], mu_y + centre[:, :, 0]
    ssim = ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)) / (
        (mu_x**2 + mu_y**2 + SSIM_C1) * (var_x + var_y + SSIM_C2)
    )
    return float(min(1.0, max(0.0, ssim.mean())))


# ---- Instruction Compliance ----------------------------------------------------------------------

def compliance(scores: list[float], policy: RoutingPolicy) -> tuple[list[bool], float]:
    """(carried out per sub-edit, share carried out) for one case's judge scores, by the routing
    policy's own pass rule, so "carried out" means here what it means in a build."""
    if not scores:
        raise ValueError("a case needs at least one sub-edit score")
    passes = [bool(p) for p in policy.sub_edit_pass_flags({"sub_edits": scores})]
    return passes, sum(passes) / len(passes)


# ---- scoring cases -------------------------------------------------------------------------------

@dataclass(slots=True)
class CaseResult:
    case_id: str
    edit_types: list[str]
    compliance: float = 0.0
    consistency: float | None = 0.0  # None: the case has no background pixels
    sub_edit_scores: list[float | None] = field(default_factory=list)
    sub_edit_pass: list[bool] = field(default_factory=list)
    sub_edit_reasons: list[str] = field(default_factory=list)
    error: str | None = None  # why the case failed (missing prediction, judge error, ...)
    resized: bool = False

    @property
    def num_sub_edits(self) -> int:
        return len(self.edit_types)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["num_sub_edits"] = self.num_sub_edits
        return data


class PredictionError(ValueError):
    """A prediction that cannot be scored (missing, unreadable, not an image)."""


def conform_prediction(prediction: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, bool]:
    """A uint8 HxWx3 array of the case's size, and whether it had to be resized."""
    from PIL import Image

    array = np.asarray(prediction)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.shape[0] < 1 or array.shape[1] < 1:
        raise PredictionError(f"prediction is not an RGB image: array {array.dtype} {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
            raise PredictionError(f"prediction has non-finite or non-numeric pixels ({array.dtype})")
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    array = array[..., :3]
    if array.shape[:2] == tuple(shape[:2]):
        return np.ascontiguousarray(array), False
    resized = Image.fromarray(array, "RGB").resize((shape[1], shape[0]), Image.Resampling.BICUBIC)
    return np.asarray(resized).copy(), True


def _view(case: EditSample, prediction: np.ndarray) -> JudgeView:
    return JudgeView(id=case.id, source=case.source, target=prediction, instruction=case.instruction,
                     sub_edits=case.sub_edits, background_mask=case.background_mask)


def score_cases(
    cases: Iterable[EditSample],
    predictions: Iterable[np.ndarray | PredictionError],
    judge: Judge,
    policy: RoutingPolicy,
    batch_size: int = 16,
) -> list[CaseResult]:
    """Score every case against its prediction (in case order); a PredictionError in place of an
    image marks that case failed. Never raises for one bad case."""
    results: list[CaseResult] = []
    pending: list[tuple[EditSample, np.ndarray, CaseResult]] = []
    for case, prediction in zip(cases, predictions, strict=True):
        result = CaseResult(case_id=case.id, edit_types=[e.type for e in case.sub_edits])
        if not case.background_mask.any():
            result.consistency = None
        results.append(result)
        if isinstance(prediction, PredictionError):
            result.error = f"prediction: {prediction}"
            result.sub_edit_scores = [None] * result.num_sub_edits
            result.sub_edit_pass = [False] * result.num_sub_edits
            continue
        try:
            image, result.resized = conform_prediction(prediction, case.source.shape)
        except PredictionError as exc:
            result.error = f"prediction: {exc}"
            result.sub_edit_scores = [None] * result.num_sub_edits
            result.sub_edit_pass = [False] * result.num_sub_edits
            continue
        result.consistency = masked_ssim(case.source, image, case.background_mask)
        pending.append((case, image, result))
        if len(pending) >= batch_size:
            _judge(pending, judge, policy)
            pending = []
    if pending:
        _judge(pending, judge, policy)
    return results


def _judge(pending: list[tuple[EditSample, np.ndarray, CaseResult]], judge: Judge, policy: RoutingPolicy) -> None:
    try:
        answers = judge.score_batch([_view(case, image) for case, image, _ in pending])
    except Exception as exc:  # a judge bug must not end the evaluation: these cases fail
        log.warning("judge %s failed on a batch: %s", getattr(judge, "name", judge), exc)
        answers = [JudgeError(f"{type(exc).__name__}: {exc}")] * len(pending)
    for (case, _, result), answer in zip(pending, answers, strict=True):
        n = result.num_sub_edits
        scores = None if isinstance(answer, JudgeError) else answer.get("sub_edits")
        if scores is None or len(scores) != n:
            why = answer if isinstance(answer, JudgeError) else f"judge gave {scores!r} for {n} sub-edits"
            result.error = f"judge: {why}"
            result.sub_edit_scores = [None] * n
            result.sub_edit_pass = [False] * n
            continue
        result.sub_edit_scores = [float(s) for s in scores]
        result.sub_edit_pass, result.compliance = compliance(result.sub_edit_scores, policy)
        result.sub_edit_reasons = [str(r) for r in answer.get("sub_edit_reasons") or []]


# ---- aggregation ----------------------------------------------------------------------------------

def _mean(values: list[float | None]) -> float | None:
    """Mean of the defined values (None where there are none)."""
    defined = [v for v in values if v is not None]
    return float(sum(defined) / len(defined)) if defined else None


def summarize(results: list[CaseResult]) -> dict[str, Any]:
    """The report's figures: the two metrics, their breakdowns and the failed cases."""
    by_count: dict[int, list[CaseResult]] = defaultdict(list)
    by_type: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        by_count[r.num_sub_edits].append(r)
        for edit_type, passed in zip(r.edit_types, r.sub_edit_pass):
            by_type[edit_type].append(passed)
    return {
        "instruction_compliance": _mean([r.compliance for r in results]),
        "background_consistency": _mean([r.consistency for r in results]),
        "cases": len(results),
        "consistency_cases": len([r for r in results if r.consistency is not None]),
        "sub_edits": sum(r.num_sub_edits for r in results),
        "failed_cases": len([r for r in results if r.error]),
        "by_sub_edit_count": {
            str(n): {
                "cases": len(group),
                "instruction_compliance": _mean([r.compliance for r in group]),
                "background_consistency": _mean([r.consistency for r in group]),
            }
            for n, group in sorted(by_count.items())
        },
        "by_edit_type": {
            t: {"sub_edits": len(passes), "instruction_compliance": _mean([float(p) for p in passes])}
            for t, passes in sorted(by_type.items())
        },
        "failed": [{"case_id": r.case_id, "error": r.error} for r in results if r.error],
    }
