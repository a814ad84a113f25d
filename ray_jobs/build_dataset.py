"""Ray job: ``tokenskip run``, for ``ray job submit`` where the CLI is not installed as a script.

    ray job submit --working-dir . -- python -m ray_jobs.build_dataset --config pipeline.yaml

Inside a Ray job RAY_ADDRESS is set, so the pipeline joins the cluster instead of starting one.
"""

import sys

from tokenskip.cli import main as tokenskip


def main(argv: list[str] | None = None) -> int:
    return tokenskip(["run", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
