"""Ray job entrypoint: ``python -m ray_jobs.train_sft --config train.yaml``.

Thin wrapper around :func:`tokenskip.train.job.main`, for ``ray job submit`` where the CLI is not
installed as a script.
"""

from __future__ import annotations

import sys

from tokenskip.train.job import main

if __name__ == "__main__":
    sys.exit(main())
