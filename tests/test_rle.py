"""pipeline.rle: the vectorised COCO RLE text is pycocotools' own, and decodes back."""

import numpy as np
import pytest
from pycocotools import mask as coco

from pipeline import rle


def masks():
    rng = np.random.default_rng(0)
    yield np.zeros((1, 1), bool)
    yield np.ones((1, 1), bool)
    yield np.zeros((0, 5), bool)
    yield np.ones((7, 3), bool)
    yield np.zeros((300, 400), bool)
    for shape in ((5, 9), (64, 48), (512, 512)):
        yield rng.random(shape) > 0.5  # many short runs
        yield rng.random(shape) > 0.995  # long runs, large negative and positive deltas
    big = np.zeros((600, 700), bool)
    big[100:500, 50:650] = True  # runs far above 2**15: several 5-bit groups
    yield big
    yield ~big
    yield big[:, ::7]  # not contiguous


@pytest.mark.parametrize("mask", list(masks()), ids=lambda m: f"{m.shape}-{int(m.sum())}")
def test_encode_is_pycocotools_text_and_decodes_back(mask):
    got = rle.encode(mask)
    assert got["size"] == list(mask.shape)
    if mask.size:
        want = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert got["counts"] == want["counts"].decode()
    assert np.array_equal(rle.decode(got), mask)
