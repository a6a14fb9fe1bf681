"""Ray job entrypoint of an export: the same as `aigc-dist export`, for `ray job submit`.

    ray job submit --working-dir . -- python jobs/export.py \
        --checkpoint s3://bucket/runs/copy-lm-tiny --output s3://bucket/runs/models/copy-lm/v2

Merges the ZeRO shards of a training checkpoint (or of a run's newest checkpoint) on one machine
and writes an artifact; `--to-hf URI` says what becomes of an artifact of the earlier format.
Exits 0 on success, 2 on a config error (e.g. no checkpoint there) and 1 on any other failure.
"""

import sys

from aigc_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
