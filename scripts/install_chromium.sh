#!/usr/bin/env bash
# Install headless Chromium for the HTML report test (tests/test_report.py): the Debian `chromium`
# package when run as root, else a message and exit 2 (scripts/install_debian_package.sh).
exec bash "$(dirname "$0")/install_debian_package.sh" chromium chromium "the report test (tests/test_report.py)"
