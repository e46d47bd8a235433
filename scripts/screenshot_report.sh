#!/usr/bin/env bash
# Render a salf HTML report to a PNG with headless Chromium (Debian: apt-get install -y chromium).
#   scripts/screenshot_report.sh REPORT.html OUT.png [WIDTH,HEIGHT]
# Nothing is fetched from the network: the report is self-contained and background services are off.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 REPORT.html OUT.png [WIDTH,HEIGHT (default 1280,2400)]" >&2
  exit 2
fi
report=$(realpath "$1")
out=$(realpath -m "$2")
size=${3:-1280,2400}
[ -f "$report" ] || { echo "$0: no such report: $1" >&2; exit 2; }
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "$0: chromium not found (apt-get install -y chromium)" >&2; exit 2; }
# file:// URL with spaces, '#' and the like percent-encoded
url=$(python3 -c 'import pathlib, sys; print(pathlib.Path(sys.argv[1]).as_uri())' "$report" 2>/dev/null || echo "file://$report")
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
mkdir -p "$(dirname "$out")"
rm -f "$out"
timeout 120 "$browser" --headless --no-sandbox --disable-gpu --disable-background-networking \
  --disable-component-update --disable-sync --no-first-run --hide-scrollbars --user-data-dir="$profile" \
  --screenshot="$out" --window-size="$size" "$url" >"$profile/chromium.log" 2>&1 || true
if [ ! -s "$out" ]; then
  echo "$0: chromium wrote no screenshot to $out; its output:" >&2
  cat "$profile/chromium.log" >&2
  exit 1
fi
echo "$out"
