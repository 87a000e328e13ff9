#!/usr/bin/env bash
# Installs the pinned playwright-core (clients/js/browser-test/package-lock.json) that drives
# Debian's chromium in tests/js_browser.rs. It downloads no browser: the tests use the
# system's `chromium` (which .ci/run installs).
set -euo pipefail
cd "$(dirname "$0")/../clients/js/browser-test"
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
npm ci --no-audit --no-fund --loglevel=error
