"""The stage contract: a callable over a batch of records that returns the records.

`RecordStage` owns the plumbing — the batch loop, skipping records that already failed, turning an
exception inside one record into that record's error — so a stage implements only `process`.
"""

from __future__ import annotations

import logging
import zlib

import numpy as np

from pipeline.record import EditSample

log = logging.getLogger(__name__)


def sample_rng(sample: EditSample, salt: str) -> np.random.Generator:
    """A generator that depends only on (build seed, sample index, stage): stages stay
    deterministic whatever worker runs them and in whatever order."""
    return np.random.default_rng([sample.seed, sample.index, zlib.crc32(salt.encode())])


class RecordStage:
    name = "stage"

    def process(self, sample: EditSample) -> None:
        """Fill this stage's fields of one sample in place; raise to fail that sample alone."""
        raise NotImplementedError

    def __call__(self, batch: list[EditSample]) -> list[EditSample]:
        for sample in batch:
            if sample.failed:
                continue
            try:
                self.process(sample)
            except Exception as exc:  # one bad record must not kill the batch
                log.warning("stage %s failed on %s: %s", self.name, sample.id, exc)
                sample.fail(self.name, exc)
        return batch
