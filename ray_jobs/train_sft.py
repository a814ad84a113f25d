"""Ray job: ``tokenskip train``, for ``ray job submit`` where the CLI is not installed as a script.

    ray job submit --working-dir . -- python -m ray_jobs.train_sft --config train.yaml
"""

import sys

from tokenskip.cli import main as tokenskip


def main(argv: list[str] | None = None) -> int:
    return tokenskip(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
