"""Ray job entrypoint: ``python -m ray_jobs.evaluate --config eval.yaml [--set k=v] [--num-gpus 1]``.

    ray job submit --working-dir . -- python -m ray_jobs.evaluate --num-gpus 1 --config eval.yaml

A job's driver usually runs on the head node, which may have no GPU: with ``--num-gpus`` (or
``--num-cpus``) the evaluation runs as one Ray task that reserves those resources, so the scheduler
places the vLLM engine on a node that has them. Without either flag it runs in the driver, exactly
like ``tokenskip evaluate``. Outputs go to the config's ``output`` (use s3:// on a cluster: a task's
local disk is not the submitter's).
"""

from __future__ import annotations

import argparse
import json
import sys

from tokenskip.config import parse_overrides
from tokenskip.evaluate import add_arguments, load_evaluate_config, run_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ray_jobs.evaluate", description=__doc__)
    add_arguments(parser)
    parser.add_argument(
        "--num-gpus",
        type=float,
        default=None,
        help="run as a Ray task reserving this many GPUs (engine.tensor_parallel_size for vLLM on GPU)",
    )
    parser.add_argument(
        "--num-cpus", type=float, default=None, help="run as a Ray task reserving this many CPUs"
    )
    args = parser.parse_args(argv)
    config = load_evaluate_config(args.config, parse_overrides(args.set))
    if args.dry_run:
        print(json.dumps(config.model_dump(mode="json"), indent=1))
        return 0
    if args.num_gpus is None and args.num_cpus is None:
        text, code = run_config(config)
    else:
        import ray

        ray.init()  # joins the job's cluster (RAY_ADDRESS) or starts a local one
        task = ray.remote(num_gpus=args.num_gpus or 0, num_cpus=args.num_cpus or 1)(run_config)
        text, code = ray.get(task.remote(config))
    print(text)
    return code


if __name__ == "__main__":
    sys.exit(main())
