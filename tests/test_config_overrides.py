"""One ``--set`` parser and one loader for every job's config."""

from __future__ import annotations

import pytest
import yaml

from tokenskip.config import OverrideError, apply_overrides, load_config, parse_overrides
from tokenskip.refresh import RefreshConfig, load_refresh_config
from tokenskip.train.config import load_train_config


def test_values_are_yaml_and_keys_must_be_dotted_paths():
    assert parse_overrides(["a.b=4", "c=true", "d=[1, 2]", "e=x=y", "f="]) == {
        "a.b": 4,
        "c": True,
        "d": [1, 2],
        "e": "x=y",
        "f": None,
    }
    for bad in ("novalue", "=1", "a..b=1", ".a=1"):
        with pytest.raises(OverrideError, match="key=value"):
            parse_overrides([bad])


def test_apply_walks_mappings_and_list_indexes_and_names_the_bad_key():
    data = {"dataset": "d", "sources": [{"path": "p"}], "engine": None}
    apply_overrides(data, {"sources.0.limit": 8, "engine.model": "m", "new.deep.key": 1})
    assert data == {
        "dataset": "d",
        "sources": [{"path": "p", "limit": 8}],
        "engine": {"model": "m"},
        "new": {"deep": {"key": 1}},
    }
    cases = {
        "dataset.x": "dataset is 'd', not a mapping or list",
        "sources.9.limit": "sources has 1 entries",
        "sources.first.limit": "sources is a list; index it with a number",
    }
    for key, message in cases.items():
        with pytest.raises(OverrideError, match=message):
            apply_overrides(data, {key: 1})


def test_every_job_loads_through_the_same_loader(tmp_path):
    refresh_yaml = tmp_path / "refresh.yaml"
    refresh_yaml.write_text(
        yaml.safe_dump(
            {
                "pipeline": {
                    "dataset": "d",
                    "sources": [{"path": "p.jsonl", "kind": "gsm8k"}],
                    "engine": {"model": "m"},
                }
            }
        )
    )
    refreshed = load_refresh_config(str(refresh_yaml), {"pipeline.sources.0.limit": 3, "keep_last": 2})
    assert refreshed.pipeline.sources[0].limit == 3 and refreshed.keep_last == 2
    assert load_config(RefreshConfig, refresh_yaml).keep_last == 7
    with pytest.raises(OverrideError):
        load_refresh_config(str(refresh_yaml), {"pipeline.sources.4.limit": 1})

    train = load_train_config("tokenskip/configs/train_example.yaml", {"optim.max_steps": 3})
    assert train.optim.max_steps == 3


def test_every_shipped_pipeline_config_validates():
    from pathlib import Path

    from tokenskip.config import load_pipeline_config

    configs = Path(__file__).resolve().parents[1] / "tokenskip" / "configs"
    gpu = load_pipeline_config(configs / "gsm8k_qwen2_5_7b_gpu.yaml")
    assert gpu.dataset != load_pipeline_config(configs / "demo.yaml").dataset
    assert gpu.compression.scorer.kind == "llmlingua2" and gpu.resources.generation_gpus == 1
    assert (
        len(gpu.dedup.eval_sets) == 2 and gpu.resources.generation_batch_size % gpu.resources.shard_size == 0
    )
