#!/usr/bin/env bash
# Headless Chromium for the browser test of the HTML reports (tests/test_reports.py).
#   start: install Debian's `chromium` (+ fonts-liberation, so text renders) when it is missing (needs root
#          and apt-get; recommends such as Mesa and udev are not needed headless); otherwise nothing.
#   stop:  nothing (the tests launch and stop their own browser processes).
# Exits non-zero with a message when Chromium is missing and cannot be installed; its tests then skip.
set -euo pipefail
case "${1:-}" in
  start)
    if command -v chromium >/dev/null 2>&1; then
      exit 0
    fi
    if [ "$(id -u)" != "0" ]; then
      echo "chromium.sh: chromium is not installed and this is not root; install Debian's chromium to run the browser test" >&2
      exit 1
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
      echo "chromium.sh: chromium is not installed and there is no apt-get to install it" >&2
      exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends chromium fonts-liberation >/dev/null 2>&1; then
      apt-get update -q >/dev/null 2>&1 || true
      apt-get install -y -q --no-install-recommends chromium fonts-liberation >/dev/null || {
        echo "chromium.sh: apt-get install chromium failed" >&2
        exit 1
      }
    fi
    command -v chromium >/dev/null 2>&1 || { echo "chromium.sh: chromium still not on PATH after install" >&2; exit 1; }
    ;;
  stop)
    exit 0
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
