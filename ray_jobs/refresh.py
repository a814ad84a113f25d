"""Ray job: ``tokenskip refresh``, the scheduled incremental refresh of a dataset (one new version
with only the new problems generated); its exit code tells the scheduler what happened.

    ray job submit --working-dir . -- python -m ray_jobs.refresh --config refresh.yaml
"""

import sys

from tokenskip.cli import main as tokenskip


def main(argv: list[str] | None = None) -> int:
    return tokenskip(["refresh", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
