#!/usr/bin/env bash
# Install the Mosquitto MQTT broker for the MQTT stream test (tests/test_mqtt_stream.py, which starts
# its own broker on 127.0.0.1). Idempotent: does nothing when `mosquitto` is on PATH (or in
# /usr/sbin, where Debian puts it). As root on Debian/Ubuntu it installs the `mosquitto` package
# with apt-get; otherwise it says what to install and exits 2.
set -euo pipefail

PATH="$PATH:/usr/sbin:/usr/local/sbin"
if command -v mosquitto >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "install_mosquitto: mosquitto not found; installing it with apt-get" >&2
  apt-get update -qq
  # The package's service is not started here: the test runs its own broker with its own config.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mosquitto >/dev/null
  command -v mosquitto >/dev/null 2>&1 || { echo "install_mosquitto: apt-get installed mosquitto but it is not on PATH" >&2; exit 2; }
  echo "install_mosquitto: $(mosquitto -h 2>/dev/null | head -1 || echo mosquitto installed)" >&2
  exit 0
fi
echo "install_mosquitto: the MQTT stream test needs the Mosquitto broker (binary 'mosquitto' on PATH or in /usr/sbin)." >&2
echo "       Install it, e.g. 'sudo apt-get install mosquitto' (Debian/Ubuntu) or 'brew install mosquitto'," >&2
echo "       then run the tests again." >&2
exit 2
