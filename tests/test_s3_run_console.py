"""A run on S3 (moto): the driver's log lands in the run folder, and the end of the console (the data's
path, the snippet that reads it, the show command) works as printed (issue 18, item 7)."""

from __future__ import annotations

import logging

import boto3

from tests.tiny_pipeline import tiny_pipeline_config
from tokenskip.commands import run as run_cmd
from tokenskip.console import RunLog
from tokenskip.schema import COMPRESSED_SCHEMA, to_table
from tokenskip.storage import RunStore, StorageConfig

DATASET = "tiny-arith"


def test_s3_run_log_is_copied_into_the_run_folder(s3_bucket, tmp_path, caplog):
    endpoint, bucket = s3_bucket
    store = RunStore(
        StorageConfig(root=f"s3://{bucket}/ds", storage_options={"endpoint_url": endpoint}), DATASET, "r1"
    )
    run_log = RunLog("run")
    logging.getLogger("tokenskip.test").addHandler(run_log.handler)
    try:
        logging.getLogger("tokenskip.test").warning("a record of the run")
        with caplog.at_level(logging.WARNING):
            run_cmd._upload_log(store, run_log)
    finally:
        logging.getLogger("tokenskip.test").removeHandler(run_log.handler)
        run_log.handler.close()
    assert not [r for r in caplog.records if "could not copy the log" in r.getMessage()]
    key = f"ds/{DATASET}/runs/r1/logs/{run_log.name}"
    body = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").get_object(
        Bucket=bucket, Key=key
    )
    assert b"a record of the run" in body["Body"].read()
    run_log.path.unlink()


def test_s3_run_console_end_reads_the_run_as_printed(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    output = StorageConfig(
        root=f"s3://{bucket}/ds",
        # moto's dummy credentials, spelled out as a user with explicit keys would.
        storage_options={"endpoint_url": endpoint, "key": "testing", "secret": "testing"},
    )
    config = tiny_pipeline_config(tmp_path / "model", tmp_path / "problems.jsonl", output)
    store = RunStore(output, DATASET, "r1")
    rows = to_table([{"key": k, "problem_id": k} for k in ("k1", "k2")], COMPRESSED_SCHEMA)
    store.write_shard("s-1", {"data": rows}, problem_ids=["k1", "k2"])
    store.commit({"counts": {}})

    text = run_cmd._where_the_data_is(config, store)
    lines = text.splitlines()
    assert lines[0].startswith(f"data: s3://{bucket}/ds/{DATASET}/runs/r1 ")
    snippet = [line.removeprefix("  ") for line in lines[lines.index("read it:") + 1 : -1]]
    code = "\n".join(snippet)
    assert f"'endpoint_url': '{endpoint}'" in code
    assert "'testing'" not in text  # credentials are never printed; a comment asks for them
    assert "# add your credentials (key, secret)" in code
    namespace: dict = {}
    exec(compile(code, "<snippet>", "exec"), namespace)  # credentials from the environment (moto's)
    assert namespace["data"].num_rows == 2
    assert lines[-1] == (
        f"examples: tokenskip show --root s3://{bucket}/ds --dataset {DATASET} "
        f'--storage-options \'{{"endpoint_url": "{endpoint}"}}\''
    )
