"""Ray job entrypoint of a backfill: the same as `aigc-dist backfill`, for `ray job submit`.

    ray job submit --working-dir . -- python jobs/backfill.py --config jobs/configs/backfill.toml \
        --backfill.run_id=copy-2026-11-24

Inside a Ray job RAY_ADDRESS is set, so the driver joins that cluster; run directly, it starts a
local Ray. Exits 0 when the run is complete, 4 when another driver holds the same run_id, 2 on a
config error and 1 on any other failure (re-running the same command resumes the run).
"""

import sys

from aigc_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["backfill", *sys.argv[1:]]))
