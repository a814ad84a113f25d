"""Ray job: ``tokenskip evaluate``, for ``ray job submit`` where the CLI is not installed as a script.

    ray job submit --working-dir . -- python -m ray_jobs.evaluate --num-gpus 1 --config eval.yaml

``--num-gpus``/``--num-cpus`` run the evaluation as one Ray task on a node that has them (the job's
driver may run on a head without GPUs); its outputs go to the config's ``output``: use s3:// there.
"""

import sys

from tokenskip.cli import main as tokenskip


def main(argv: list[str] | None = None) -> int:
    return tokenskip(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
