#!/usr/bin/env bash
# Install headless Chromium for the HTML report test (tests/test_report.py). Idempotent: does
# nothing when `chromium` is on PATH. As root on Debian/Ubuntu it installs the `chromium` package
# with apt-get; otherwise it says what to install and exits 2.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "install_chromium: chromium not found; installing it with apt-get" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  command -v chromium >/dev/null 2>&1 || { echo "install_chromium: apt-get installed chromium but it is not on PATH" >&2; exit 2; }
  echo "install_chromium: $(chromium --version 2>/dev/null || echo chromium installed)" >&2
  exit 0
fi
echo "install_chromium: the report test needs Chromium (binary 'chromium' on PATH)." >&2
echo "       Install it, e.g. 'sudo apt-get install chromium' (Debian/Ubuntu) or your distribution's package," >&2
echo "       then run the tests again." >&2
exit 2
