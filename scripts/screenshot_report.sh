#!/usr/bin/env bash
# Render the demo's report in headless Chromium (Debian's `chromium`) to a PNG, to look at it as a reader would.
#
#   scripts/screenshot_report.sh [REPORT_HTML] [OUT_PNG] [WIDTH] [HEIGHT]
#   scripts/screenshot_report.sh aigc-demo/report/index.html /tmp/report.png 1280 6000
#
# Needs `apt-get install -y chromium` (not part of `make test`: a check by eye, not a test).
set -euo pipefail
report=${1:-aigc-demo/report/index.html}
out=${2:-aigc-demo/report-screenshot.png}
width=${3:-1280}
height=${4:-6000}
[ -f "$report" ] || { echo "no report at $report; run 'make demo' first" >&2; exit 1; }
command -v chromium >/dev/null || { echo "chromium is missing: apt-get install -y chromium" >&2; exit 1; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$profile" \
  --window-size="$width,$height" --screenshot="$(realpath -m "$out")" "file://$(realpath "$report")" 2>/dev/null
echo "screenshot: $out"
