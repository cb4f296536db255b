"""Routing thresholds: boundaries, validation, and the stage that writes verdicts."""

from __future__ import annotations

import math

import pytest

from pipeline.record import EditSample, SubEdit
from pipeline.routing import RouteStage, RoutingPolicy

POLICY = RoutingPolicy(sub_edit_pass=0.8, background_accept=0.9, background_reject=0.5,
                       overall_accept=0.85, overall_reject=0.6)


def scores(subs=(1.0, 1.0), background=1.0, overall=None):
    overall = min(list(subs) + [background]) if overall is None else overall
    return {"sub_edits": list(subs), "background": background, "overall": overall}


def test_defaults_are_valid_and_ordered():
    policy = RoutingPolicy()
    assert policy.background_accept >= policy.background_reject
    assert policy.overall_accept >= policy.overall_reject
    assert RoutingPolicy(**{}) == policy
    assert RoutingPolicy(**policy.to_dict()) == policy


@pytest.mark.parametrize(
    ("overall", "route"),
    [(1.0, "accept"), (0.85, "accept"), (0.8499, "borderline"), (0.6, "borderline"),
     (0.5999, "reject"), (0.0, "reject")],
)
def test_overall_boundaries(overall, route):
    assert POLICY.route(scores(subs=(1.0, 1.0), overall=overall)) == route


@pytest.mark.parametrize(
    ("background", "route"),
    [(1.0, "accept"), (0.9, "accept"), (0.8999, "borderline"), (0.5, "borderline"),
     (0.4999, "reject")],
)
def test_background_boundaries(background, route):
    assert POLICY.route(scores(background=background, overall=0.95)) == route


def test_a_failed_sub_edit_blocks_accept():
    # At the pass bar it passes; just under it the pair goes to a person even with a high overall.
    assert POLICY.route(scores(subs=(1.0, 0.8), overall=0.9)) == "accept"
    assert POLICY.route(scores(subs=(1.0, 0.7999), overall=0.9)) == "borderline"
    assert POLICY.sub_edit_pass_flags(scores(subs=(0.8, 0.7999))) == [True, False]


def test_reject_wins_over_accept():
    assert POLICY.route(scores(subs=(1.0,), background=0.1, overall=0.95)) == "reject"


def test_no_background_score_counts_as_untouched():
    assert POLICY.route({"sub_edits": [1.0], "background": None, "overall": 0.9}) == "accept"


def test_equal_thresholds_leave_no_borderline_band():
    policy = RoutingPolicy(overall_accept=0.7, overall_reject=0.7, background_accept=0.5,
                           background_reject=0.5, sub_edit_pass=0.0)
    assert policy.route(scores(overall=0.7)) == "accept"
    assert policy.route(scores(overall=0.6999)) == "reject"


@pytest.mark.parametrize("score", ["overall", "background"])
def test_accept_below_reject_is_refused_with_a_clear_message(score):
    with pytest.raises(ValueError, match=rf"{score}_accept \(0.4\) is below {score}_reject \(0.6\)"):
        RoutingPolicy(**{f"{score}_accept": 0.4, f"{score}_reject": 0.6})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("sub_edit_pass", 1.5, "within 0..1"), ("overall_reject", -0.1, "within 0..1"),
     ("overall_accept", math.nan, "must be a number"), ("background_accept", "0.9", "must be a number"),
     ("sub_edit_pass", True, "must be a number")],
)
def test_bad_thresholds_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        RoutingPolicy(**{field: value})


def test_unknown_threshold_names_are_refused():
    with pytest.raises(TypeError):
        RoutingPolicy(accept=0.9)


def test_policy_is_frozen():
    with pytest.raises(AttributeError):
        POLICY.overall_accept = 0.1  # type: ignore[misc]


def test_scores_without_the_needed_keys_are_an_error():
    with pytest.raises(ValueError, match="lack 'overall'"):
        POLICY.route({"sub_edits": [1.0]})


def _sample(index: int, **fields) -> EditSample:
    sample = EditSample(id=f"s{index}", index=index, seed=0,
                        sub_edits=[SubEdit("recolor", "make it red"), SubEdit("remove", "remove it")])
    for name, value in fields.items():
        setattr(sample, name, value)
    return sample


def test_route_stage_writes_pass_flags_and_verdicts():
    accepted = _sample(0, scores=scores(subs=(0.95, 0.9)))
    borderline = _sample(1, scores=scores(subs=(0.95, 0.7), overall=0.7))
    rejected = _sample(2, scores=scores(subs=(0.95, 0.1)))
    RouteStage(POLICY)([accepted, borderline, rejected])
    assert [s.verdict for s in (accepted, borderline, rejected)] == ["accept", "borderline", "reject"]
    assert accepted.scores["sub_edit_pass"] == [True, True]
    assert borderline.scores["sub_edit_pass"] == [True, False]
    assert rejected.scores["sub_edit_pass"] == [True, False]
    assert all(s.verdict_by == "judge" for s in (accepted, borderline, rejected))


def test_route_stage_leaves_judge_errors_and_failed_samples_alone():
    judge_error = _sample(0, verdict="judge_error", verdict_by="judge", error="JudgeError: timeout",
                          error_stage="judge")
    failed = _sample(1)
    failed.fail("edit", ValueError("no scene"))
    RouteStage()([judge_error, failed])
    assert judge_error.verdict == "judge_error" and "sub_edit_pass" not in judge_error.scores
    assert failed.verdict == "error" and failed.error_stage == "edit" and failed.verdict_by is None


def test_route_stage_fails_a_sample_without_scores_alone():
    unscored = _sample(0)
    scored = _sample(1, scores=scores())
    RouteStage()([unscored, scored])
    assert unscored.verdict == "error" and unscored.error_stage == "route"
    assert "no judge scores" in unscored.error
    assert scored.verdict == "accept"


def test_a_judge_brings_its_own_thresholds_and_build_parameters_override_them():
    class CalibratedJudge:
        routing_defaults = {"sub_edit_pass": 0.8, "overall_accept": 0.8}

    policy = RoutingPolicy.for_judge(CalibratedJudge(), {"overall_accept": 0.85})
    assert policy.sub_edit_pass == 0.8
    assert policy.overall_accept == 0.85
    assert policy.background_accept == RoutingPolicy().background_accept
    assert RoutingPolicy.for_judge(object()) == RoutingPolicy()
    with pytest.raises(ValueError, match="overall_accept"):
        RoutingPolicy.for_judge(CalibratedJudge(), {"overall_reject": 0.9})


def test_an_unknown_sub_edit_score_is_never_accepted():
    unknown = {"sub_edits": [1.0, None], "background": 1.0, "overall": 1.0}
    assert POLICY.route(unknown) == "borderline"
    assert POLICY.sub_edit_pass_flags(unknown) == [True, False]
    # A reject still wins: an unknown score does not shield a bad background.
    assert POLICY.route({**unknown, "background": 0.2, "overall": 0.2}) == "reject"
    sample = EditSample(id="u", index=0, seed=0, scores=dict(unknown))
    RouteStage(POLICY)([sample])
    assert sample.verdict == "borderline" and sample.scores["sub_edit_pass"] == [True, False]
