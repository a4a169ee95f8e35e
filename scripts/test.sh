#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the whole suite (notebooks included), and with
# it the Node.js client's tests (tests/test_node_client.py: the client against runtime.score and
# runtime.check on a tiny exported model, then `node --test` on clients/node/test/).
# The client's npm packages are installed from clients/node/package-lock.json by `npm ci
# --ignore-scripts` (onnxruntime-node with its bundled CPU binaries; its install script would
# download more), only when node_modules does not match the lock. Node.js (>= 18) and npm are
# required: IMRAM_SKIP_NODE=1 runs the suite without the client's tests (they are then skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# chromium: the headless browser tests/test_html.py opens the --html result pages in (Debian's package).
# Installed only when missing and running as root; where it cannot be, those checks are skipped (they say so).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium (headless browser for tests/test_html.py)" >&2
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1; then
        echo "setup: chromium could not be installed; tests/test_html.py skips its browser checks" >&2
    fi
fi
if [ "${IMRAM_SKIP_NODE:-0}" != 1 ]; then
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        echo "error: the test command needs node (>= 18) and npm for the Node.js client's tests;" \
             "install them, or run IMRAM_SKIP_NODE=1 bash scripts/test.sh to skip those tests" >&2
        exit 2
    fi
    stamp=clients/node/node_modules/.imram-min-installed
    want=$( (node --version; cat clients/node/package.json clients/node/package-lock.json) | sha256sum | cut -c1-16)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "setup: installing the Node.js client's packages (npm ci --ignore-scripts in clients/node)" >&2
        (cd clients/node && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
        echo "$want" > "$stamp"
    fi
    export IMRAM_REQUIRE_NODE=1  # tests/test_node_client.py fails, not skips, without the client
fi
exec .venv/bin/python -m pytest -q "$@"
