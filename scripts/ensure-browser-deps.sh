#!/usr/bin/env bash
# Install what the browser tests (tests/e2e/test_ohif.py) need, only when missing; safe to run again.
#
#   chromium      Debian's package, by apt-get when /usr/bin/chromium is missing (as root). Installed with
#                 its recommended packages: that is the set the browser tests were proven with (headless,
#                 software WebGL through SwiftShader, as root with --no-sandbox).
#   node_modules  `npm ci` from package-lock.json (@ohif/app's ready-built viewer, playwright-core), when
#                 node_modules is missing or the lockfile is newer than the last install.
#
# Nothing here fails `make test`: what cannot be installed is reported, and the browser tests say why they
# skip (no chromium) or fail (no node_modules while chromium is there).
set -uo pipefail
cd "$(dirname "$0")/.."

say() { echo "ensure-browser-deps: $*"; }
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"

if [ -x "$CHROMIUM" ]; then
    say "chromium present ($CHROMIUM)"
elif [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing chromium with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt=(apt-get -o DPkg::Lock::Timeout=300 -qq)
    if "${apt[@]}" update && "${apt[@]}" install -y chromium >/dev/null; then
        say "installed $("$CHROMIUM" --version 2>/dev/null | head -1)"
    else
        say "apt-get could not install chromium: the browser tests will be skipped"
    fi
else
    say "chromium is missing and apt-get is not usable (not root or no apt): the browser tests will be skipped"
fi

if ! command -v npm >/dev/null 2>&1; then
    say "npm is missing (Node.js 20 or newer is needed): the browser tests will be skipped"
    exit 0
fi
if [ ! -d node_modules ] || [ ! -f node_modules/.package-lock.json ] \
    || [ package-lock.json -nt node_modules/.package-lock.json ] || [ package.json -nt node_modules/.package-lock.json ]; then
    say "npm ci (package-lock.json)"
    if npm ci --no-audit --no-fund --loglevel=error; then
        say "node_modules installed"
    else
        say "npm ci failed: the browser tests will fail until it succeeds"
    fi
else
    say "node_modules up to date"
fi
exit 0
