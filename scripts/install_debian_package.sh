#!/usr/bin/env bash
# Install a Debian package that a test needs, once: install_debian_package.sh BINARY PACKAGE NEEDED_BY
# Idempotent: does nothing when BINARY is on PATH (or in /usr/sbin, where Debian puts daemons). As root
# on Debian/Ubuntu it installs PACKAGE with apt-get; otherwise it says what to install and exits 2.
set -euo pipefail
binary=$1 package=$2 needed_by=$3
me="install_${binary}"

PATH="$PATH:/usr/sbin:/usr/local/sbin"
if command -v "$binary" >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "$me: $binary not found; installing the $package package with apt-get" >&2
  apt-get update -qq
  # A daemon's service is not started here: a test that needs one runs its own, with its own config.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$package" >/dev/null
  command -v "$binary" >/dev/null 2>&1 || { echo "$me: apt-get installed $package but $binary is not on PATH" >&2; exit 2; }
  echo "$me: $package installed ($(command -v "$binary"))" >&2
  exit 0
fi
echo "$me: $needed_by needs $binary (binary '$binary' on PATH or in /usr/sbin)." >&2
echo "       Install it, e.g. 'sudo apt-get install $package' (Debian/Ubuntu) or your distribution's package," >&2
echo "       then run the tests again." >&2
exit 2
