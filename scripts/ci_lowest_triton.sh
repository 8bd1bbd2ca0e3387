#!/usr/bin/env bash
# CI guard for the lowest Triton mixpo supports: the GPU machine runs triton 3.6, while the
# developers' machines have a newer one. Compiles every registered kernel configuration for
# sm_80 and sm_90 (A100 / H100 / H200) under triton 3.6.0, on the CPU, with no GPU:
#
#   1. a side virtualenv, created once and reused (${XDG_CACHE_HOME:-~/.cache}/mixpo-ci/
#      triton-3.6), with --system-site-packages so torch (and everything else mixpo.kernels
#      imports) comes from the system, and triton==3.6.0 installed inside it, which shadows the
#      system's triton (the venv's site-packages comes first on sys.path); the script checks
#      that `import triton` in the venv really reports 3.6.0 and stops otherwise;
#   2. `python -m mixpo.kernels.compile_check --arch 80 90` in that venv, TRITON_INTERPRET
#      unset, PYTHONPATH at this checkout (no install of mixpo).
#
# Exits non-zero when the venv cannot be built, triton 3.6.0 does not shadow the system one,
# or any kernel configuration fails to compile. Records go to $MIXPO_CI_JSON when set.
#   bash scripts/ci_lowest_triton.sh            # TRITON_VERSION=3.6.0 by default
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
TRITON_VERSION="${TRITON_VERSION:-3.6.0}"
VENV="${MIXPO_CI_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mixpo-ci/triton-${TRITON_VERSION%.*}}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV (system site-packages visible, for torch)"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi

have="$("$VENV/bin/python" -c 'import importlib.metadata as m
try:
    print(m.version("triton"))
except m.PackageNotFoundError:
    print("none")' 2>/dev/null || echo none)"
venv_site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ "$have" != "$TRITON_VERSION" ] || [ ! -d "$venv_site/triton" ]; then
    echo "installing triton==$TRITON_VERSION into $VENV (about 190 MB)"
    # --no-deps: triton 3.x has no runtime requirements, and nothing may replace the system
    # torch; --ignore-installed: install into the venv even though the system has a triton.
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
        --ignore-installed "triton==$TRITON_VERSION"
fi

# Run from outside the checkout so nothing but PYTHONPATH decides what is imported.
cd "$(mktemp -d)"
export PYTHONPATH="$REPO"
unset TRITON_INTERPRET
found="$("$VENV/bin/python" -c 'import triton; print(triton.__version__, triton.__file__)')"
echo "venv triton: $found"
case "$found" in
    "$TRITON_VERSION "*) ;;
    *) echo "error: the venv imports triton ${found%% *}, not $TRITON_VERSION (is PYTHONPATH or a" \
            ".pth file putting the system triton first?)" >&2
       exit 1 ;;
esac
torch_found="$("$VENV/bin/python" -c 'import torch; print(torch.__version__, torch.__file__)')"
echo "venv torch:  $torch_found"

args=(--arch 80 90)
if [ -n "${MIXPO_CI_JSON:-}" ]; then
    args+=(--json "$MIXPO_CI_JSON")
fi
log="$(mktemp)"
status=0
"$VENV/bin/python" -m mixpo.kernels.compile_check "${args[@]}" | tee "$log" || status=$?
total="$(grep -c -E '^(ok |FAIL) ' "$log" || true)"
failed="$(grep -c '^FAIL ' "$log" || true)"
if [ "$status" -ne 0 ] || [ "$failed" -ne 0 ] || [ "$total" -eq 0 ]; then
    echo "triton $TRITON_VERSION: $failed of $total kernel configurations FAILED to compile" \
         "(exit $status)" >&2
    grep '^FAIL ' "$log" >&2 || true
    exit 1
fi
echo "triton $TRITON_VERSION: all $total kernel configurations compiled for sm_80 and sm_90"
