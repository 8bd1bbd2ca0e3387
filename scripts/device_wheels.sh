#!/usr/bin/env bash
# Wheels for the GPU machine, which has no network and no package index: Python 3.12, torch
# 2.11 (cu130), triton 3.6, transformers 5.17 (so huggingface-hub >= 1.5, < 2.0), and none of
# datasets, trl, liger-kernel, cut-cross-entropy. mixpo itself travels as the working tree
# (PYTHONPATH=.), so only its missing dependencies and the peers that benchmarks/gpu_check.py
# compares against are carried.
#
#   bash scripts/device_wheels.sh [download]   # here: fetch the pinned set into .wheels/
#   bash scripts/device_wheels.sh install      # there: install the carried wheels offline
#   bash scripts/device_wheels.sh list         # print the pinned set
#
# download: `pip download --no-deps --only-binary=:all:` for cp312 on manylinux x86_64
# (manylinux2014 = glibc 2.17, and manylinux_2_28: recent pyarrow/pandas ship only that tag;
# the machine's torch 2.11 wheels are manylinux_2_28 themselves, so its glibc is >= 2.28).
# Pure-python wheels are taken as they are. Never torch, triton or nvidia-* (the machine has
# its own; the script refuses them). Fails if the folder plus the working tree that travels
# with it would pass the 64 MiB the machine accepts, and prints what the folder holds.
#
# install: `pip install --no-deps --no-index` of every carried wheel whose distribution is
# not installed yet; one already present (any version) is kept and named, so the machine's
# own packages (numpy, requests, ...) are never replaced. Equivalent on a machine that lacks
# them all to `pip install --no-deps --no-index .wheels/*.whl`.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
WHEELS="${MIXPO_WHEELS:-$REPO/.wheels}"
LIMIT_MIB=64
PYTHON="${PYTHON:-python}"

# Pinned: the peers at the versions the benchmarks name, datasets and its dependencies that a
# plain torch + transformers image lacks, and the dependencies of trl that it lacks.
PINS=(
    # peers
    trl==1.16.0                 # requires accelerate, datasets, pandas, psutil, pyarrow
    liger-kernel==0.8.5         # requires torch, triton (present)
    cut-cross-entropy==25.1.1   # requires torch, triton (present)
    accelerate==1.15.0          # trl; requires psutil + packages the machine has
    psutil==7.2.2
    # datasets 4.8.5: the newest whose huggingface-hub range (>= 0.25, < 2.0) surely holds
    # transformers 5.17's (>= 1.5, < 2.0); datasets 5.x needs hub >= 1.31. trl needs >= 4.7.
    datasets==4.8.5
    pyarrow==21.0.0             # the oldest datasets 4.8.5 and trl accept: the smallest (43 MB)
    pandas==2.3.3               # pandas 2.x runs on numpy 1.26 and 2.x alike (3.x needs 2.x)
    python-dateutil==2.9.0.post0
    six==1.17.0
    pytz==2025.2
    tzdata==2025.2
    dill==0.4.1                 # datasets: < 0.4.2
    multiprocess==0.70.19       # datasets: < 0.70.20; needs dill >= 0.4.1
    xxhash==3.6.0
    requests==2.32.5            # datasets 4.8 imports it; hub 1.x (httpx) does not bring it
    charset-normalizer==3.4.4
    urllib3==2.5.0
    idna==3.10
    certifi==2025.10.5
)
FORBIDDEN='^(torch|triton|nvidia[-_]|pytorch[-_]triton|cuda[-_])'

names() { for pin in "${PINS[@]}"; do echo "${pin%%==*}"; done; }

download() {
    for name in $(names); do
        if echo "$name" | grep -qiE "$FORBIDDEN"; then
            echo "error: $name must not be carried (the machine has its own)" >&2; exit 1
        fi
    done
    mkdir -p "$WHEELS"
    rm -f "$WHEELS"/*.whl
    # (grep -v: this machine's pip config names local indexes that lack some packages.)
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --abi cp312 --abi abi3 --abi none \
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
        --platform any --dest "$WHEELS" --disable-pip-version-check --quiet "${PINS[@]}" \
        2> >(grep -v "^WARNING: Location 'file:" >&2)
    local bad
    bad="$(ls "$WHEELS" | grep -iE "$FORBIDDEN" || true)"
    if [ -n "$bad" ]; then
        echo "error: forbidden wheels in $WHEELS: $bad" >&2; exit 1
    fi
    local count
    count="$(ls "$WHEELS"/*.whl | wc -l)"
    if [ "$count" -ne "${#PINS[@]}" ]; then
        echo "error: expected ${#PINS[@]} wheels, got $count in $WHEELS" >&2; exit 1
    fi
    echo "wheels in $WHEELS:"
    ls -l "$WHEELS" | awk 'NR > 1 {printf "  %8.2f MiB  %s\n", $5 / 1048576, $9}' | sort -rn
    local wheel_bytes tree_bytes
    wheel_bytes="$(du -cb "$WHEELS"/*.whl | tail -1 | cut -f1)"
    # What travels with the wheels: tracked files plus untracked ones git does not ignore.
    tree_bytes="$(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
        | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')"
    awk -v w="$wheel_bytes" -v t="$tree_bytes" -v limit="$LIMIT_MIB" 'BEGIN {
        printf "wheels %.2f MiB + working tree %.2f MiB = %.2f MiB (limit %d MiB)\n",
               w / 1048576, t / 1048576, (w + t) / 1048576, limit
        if (w + t > limit * 1048576) {
            print "error: over the limit of what the GPU machine accepts" > "/dev/stderr"
            exit 1
        }
    }'
}

install() {
    if [ ! -d "$WHEELS" ] || ! ls "$WHEELS"/*.whl > /dev/null 2>&1; then
        echo "error: no wheels in $WHEELS (run scripts/device_wheels.sh download first)" >&2
        exit 1
    fi
    local wanted=() wheel dist
    for wheel in "$WHEELS"/*.whl; do
        dist="$(basename "$wheel" | cut -d- -f1)"
        if have="$("$PYTHON" -c "import importlib.metadata as m, sys
print(m.version(sys.argv[1]))" "$dist" 2> /dev/null)"; then
            echo "kept installed $dist $have (carried: $(basename "$wheel"))"
        else
            wanted+=("$wheel")
        fi
    done
    if [ "${#wanted[@]}" -gt 0 ]; then
        "$PYTHON" -m pip install --no-deps --no-index --disable-pip-version-check --quiet \
            "${wanted[@]}"
    fi
    echo "installed ${#wanted[@]} of $(ls "$WHEELS"/*.whl | wc -l) carried wheels"
}

case "${1:-download}" in
    download) download ;;
    install) install ;;
    list) printf '%s\n' "${PINS[@]}" ;;
    *) echo "usage: $0 [download|install|list]" >&2; exit 2 ;;
esac
