#!/usr/bin/env bash
# Write the cluster's Ray token from AWS Secrets Manager to Ray's token file, before Ray starts.
#
#   cluster/fetch-ray-token.sh SECRET_ID            # -> ~/.ray/auth_token (or $RAY_AUTH_TOKEN_PATH)
#
# The launcher's nodes run it with their instance role (cluster/iam/node-policy.json allows reading
# this one secret), so the token is never in the cluster config, the image or a command line. The file
# is the node user's only (0600); with RAY_AUTH_MODE=token, Ray reads it and refuses to start
# without it. A secret shorter than 32 characters is refused: a token is what stands between the
# Jobs API and anyone on the network.
set -euo pipefail
if [ $# -ne 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: $0 SECRET_ID   (a Secrets Manager secret holding the Ray token)" >&2
    exit 2
fi
umask 077
exec "${PYTHON:-python}" - "$1" "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" <<'PY'
import os
import sys
from pathlib import Path

import boto3

secret_id, path = sys.argv[1], Path(sys.argv[2])
token = boto3.client("secretsmanager").get_secret_value(SecretId=secret_id)["SecretString"].strip()
if len(token) < 32:
    sys.exit(f"fetch-ray-token: secret {secret_id} holds {len(token)} characters; a Ray token needs >= 32 "
             "(openssl rand -hex 32)")
path.parent.mkdir(parents=True, exist_ok=True)
partial = path.with_name(f".{path.name}.partial")
partial.write_text(token)
os.chmod(partial, 0o600)
partial.replace(path)  # a reader never sees half a token
print(f"fetch-ray-token: wrote the Ray token of {secret_id} to {path}", file=sys.stderr)
PY
