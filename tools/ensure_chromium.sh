#!/usr/bin/env bash
# The HTML report's browser tests (tests/test_report.py, tests/test_demo.py) need a headless Chromium.
# `make test` and `make test-fast` run this first (so .ci/run does too): it installs Debian's
# `chromium` when none is on the PATH and that is possible (root, or sudo without a password prompt),
# else it fails with one line saying what to run. The one place this logic lives.
set -euo pipefail
for name in chromium chromium-browser google-chrome; do
  if command -v "$name" >/dev/null 2>&1; then exit 0; fi
done
how="sudo apt-get install -y chromium"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "chromium not found, and no apt-get to install it: install Chromium (chromium on the PATH), then run make test again" >&2
  exit 1
fi
if [ "$(id -u)" = 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  echo "chromium not found and this user cannot install it (not root, no password-less sudo): run '$how', then make test again" >&2
  exit 1
fi
echo "installing chromium (apt-get) for the report's browser tests" >&2
log="$(mktemp "${TMPDIR:-/tmp}/tokenskip-chromium-install.XXXXXX")"
if ! { "${as_root[@]}" apt-get update -qq && "${as_root[@]}" apt-get install -y -qq chromium; } >"$log" 2>&1; then
  echo "chromium could not be installed (apt-get's output: $log): run '$how', then make test again" >&2
  exit 1
fi
rm -f "$log"
