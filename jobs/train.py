"""Ray job entrypoint of training: the same as `aigc-dist train`, for `ray job submit`.

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/train_lm_tiny.toml \
        --train.storage_path=s3://bucket/runs

Inside a Ray job RAY_ADDRESS is set, so the driver joins that cluster; run directly, it starts a
local Ray. Exits 0 when training finished (and exported its artifact), 2 on a config error and 1 on
any other failure; running the same command again resumes the run from its latest checkpoint.
"""

import sys

from aigc_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
