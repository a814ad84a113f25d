"""Ray job: build a compressed CoT dataset.

    ray job submit --working-dir . -- python -m ray_jobs.build_dataset --config pipeline.yaml

Inside a Ray job RAY_ADDRESS is set, so the pipeline joins the cluster instead of starting one.
"""

import sys

from tokenskip.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
