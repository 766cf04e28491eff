#!/usr/bin/env bash
# Everything sokhan needs on a fresh machine, in ./.venv: the CPU build of torch, the package (editable) with its
# test extra, and fonts for Persian and Chinese plot labels. Running it again is cheap: the installs are skipped
# while pyproject.toml and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
stamp=.venv/.sokhan-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # Ask for torch first and by exact version: 2.13.0 is the CPU build (a few hundred MB, on CI's disk); left to
    # the dependency resolver, pip would fetch a multi-GB CUDA build.
    .venv/bin/python -m pip install -q torch==2.13.0
    .venv/bin/python -m pip install -q -e ".[test]"
    echo "$want" > "$stamp"
fi

# Plot labels need a font with Arabic script and one with Han. Missing fonts only make plots show boxes, so a
# machine where they cannot be installed (no root, no apt) gets a warning, not a failure.
if ! fc-list 2>/dev/null | grep -q "Noto Sans CJK" || ! fc-list 2>/dev/null | grep -q "Noto Sans Arabic"; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            fonts-noto-core fonts-noto-cjk >/dev/null) || echo "setup: warning: could not install Noto fonts; Persian/Chinese plot labels may show boxes" >&2
    else
        echo "setup: warning: install fonts-noto-core and fonts-noto-cjk (or any Arabic-script and Han fonts) for readable plot labels" >&2
    fi
fi
