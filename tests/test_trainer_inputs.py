"""Bad training inputs end in one clear line, not a traceback: a truncated shard is read up to
its damage, a wrongly typed config value is named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import BuildConfig
from pipeline.unit import UnitPipeline
from trainer.config import ConfigError, load_config
from trainer.data import count_samples

ROOT = Path(__file__).resolve().parents[1]


def test_a_truncated_shard_counts_the_samples_before_the_damage(tmp_path):
    config = BuildConfig(count=6, resolution=64, shard_size=6, seed=2, defect_rate=0.0)
    UnitPipeline(config, tmp_path).run(0)
    shard = tmp_path / "shards" / "train-000000.tar"
    whole = count_samples(shard)
    assert whole >= 2
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert 0 < count_samples(shard) < whole


@pytest.mark.parametrize("override, message", [
    ({"train": {"learning_rate": "fast"}}, "TrainConfig.learning_rate must be float, got 'fast'"),
    ({"train": {"batch_size": 2.5}}, "TrainConfig.batch_size must be int"),
    ({"train": {"channels_last": "yes"}}, "TrainConfig.channels_last must be bool"),
    ({"model": {"resolution": True}}, "ModelConfig.resolution must be int"),
])
def test_a_wrongly_typed_config_value_is_named(tmp_path, override, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(override))
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(str(path))
    result = subprocess.run([sys.executable, "-m", "flows.cli", "train", "--data", str(tmp_path),
                             "--config", str(path), "--steps", "1", "--out", str(tmp_path / "ckpt")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
