#!/usr/bin/env bash
# Debian's Chromium for the browser test tier (tests/browser/, pytest marker `browser`).
# Playwright drives it at /usr/bin/chromium; no browser is downloaded by Playwright itself.
# Runs as root (CI and the sessions here are root); does nothing when Chromium is already there.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_browser.sh: no /usr/bin/chromium and not root; run it as root (apt-get install chromium)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium >/dev/null
/usr/bin/chromium --version 2>/dev/null
