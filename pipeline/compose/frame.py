"""Where things are in the frame, in words: the nine regions (thirds), the four relations and
the margins that make a phrase robust. Both composers' referring expressions read positions
through these functions (points are (x, y) fractions of the width and height)."""

from __future__ import annotations

import math

# Coarse regions of the frame: (row, column) in thirds; None = any.
REGIONS: dict[str, tuple[int | None, int | None]] = {
    "top left": (0, 0),
    "top": (0, None),
    "top right": (0, 2),
    "left": (None, 0),
    "middle": (1, 1),
    "right": (None, 2),
    "bottom left": (2, 0),
    "bottom": (2, None),
    "bottom right": (2, 2),
}
REGION_PHRASES = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "middle": "in the middle",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
# The 9 cells, named by the region phrase a reader would use for a point inside each.
CELLS: dict[tuple[int, int], str] = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "middle", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
RELATIONS = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
# Robustness margins (fractions of the frame): the target must be this far inside its region /
# past its landmark, every other candidate this far outside.
POSITION_MARGIN = 0.04
RELATION_GAP = 0.06
RELATION_SLACK = 0.03

SIZE_WORDS = {"small": "small", "medium": "medium-sized", "large": "large"}


def _in_band(value: float, band: int, slack: float) -> bool:
    low = -math.inf if band == 0 else band / 3 - slack
    high = math.inf if band == 2 else (band + 1) / 3 + slack
    return low <= value < high


def in_region(point: tuple[float, float], region: str, slack: float = 0.0) -> bool:
    """Whether the point lies in the region, grown by `slack` (shrunk if negative)."""
    row, col = REGIONS[region]
    return (row is None or _in_band(point[1], row, slack)) and (
        col is None or _in_band(point[0], col, slack))


def related(a: tuple[float, float], relation: str, b: tuple[float, float], slack: float = 0.0) -> bool:
    """The loose reading of a relation: "left of" = a left of b (+ slack)."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if relation == "left of":
        return dx < slack
    if relation == "right of":
        return dx > -slack
    if relation == "above":
        return dy < slack
    if relation == "below":
        return dy > -slack
    raise ValueError(f"unknown relation {relation!r}")


def clearly_related(a: tuple[float, float], relation: str, b: tuple[float, float]) -> bool:
    """The strict reading: clearly on that side, along the dominant axis."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    horizontal = abs(dx) >= abs(dy)
    if relation == "left of":
        return horizontal and dx < -RELATION_GAP
    if relation == "right of":
        return horizontal and dx > RELATION_GAP
    if relation == "above":
        return not horizontal and dy < -RELATION_GAP
    return not horizontal and dy > RELATION_GAP
