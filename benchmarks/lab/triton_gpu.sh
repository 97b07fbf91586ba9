#!/usr/bin/env bash
# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
#
# Check the Hopper kernels on a newer Triton on a GPU machine that has torch + Triton 3.6 and cannot download:
# a slimmed copy of the newer wheel travels in pieces of 20 MiB (the device tool carries 64 MiB a call) into the ignored
# folder .tritonwheel/, one piece a call, and is unpacked beside the machine's own Triton (.tritonwheel/site, first
# on PYTHONPATH only for the steps of that version).
#
#   bash benchmarks/lab/triton_gpu.sh prepare [3.7.1] [3.12]   # here: download the wheel, split it into pieces
#   bash benchmarks/lab/triton_gpu.sh pieces                   # here: list the pieces (one `carry` per call)
#   bash benchmarks/lab/triton_gpu.sh have                     # there: which pieces arrived (a call that carries one)
#   bash benchmarks/lab/triton_gpu.sh run OUT [STEP ...]       # there: assemble, install, test and time both
#
# STEPs, run in this order by default (most needed first), each under its own time limit and all under
# $TRITON_GPU_BUDGET seconds (default 560): install, new-tests, base-bench, new-bench, new-check, base-tests,
# base-check. "base" is the machine's Triton, "new" the carried one. A step that no longer fits the budget is
# skipped and named in OUT/summary.txt; a later call on the same warm machine can run the skipped steps (the
# install and Triton's kernel cache stay there). Logs: OUT/base/*.txt, OUT/new/*.txt, OUT/summary.txt.
set -u
cd "$(dirname "$0")/../.."
REPO=$PWD
SELF=$REPO/benchmarks/lab/triton_gpu.sh
DIR=$REPO/.tritonwheel
PY=${PYTHON:-python3}

prepare() {
    local version=${1:-3.7.1} pyver=${2:-3.12}
    rm -rf "$DIR" && mkdir -p "$DIR/dl" "$DIR/slim"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$DIR/dl" "triton==$version" || exit 1
    local wheel
    wheel=$(ls "$DIR"/dl/triton-*.whl) || exit 1
    # A slim copy travels in fewer pieces (~190 MB wheel -> ~50 MB): the profiler's CUPTI libraries, the
    # instrumentation test library and FileCheck are not used by these steps, symbols are stripped, and before 3.9
    # the sm_100 ptxas is not the one sm_90 compiles with.
    "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$wheel" "$DIR/slim" || exit 1
    (cd "$DIR/slim" && rm -rf triton/backends/nvidia/lib/cupti triton/instrumentation triton/FileCheck \
        && case $version in 3.[0-8].*) rm -f triton/backends/nvidia/bin/ptxas-blackwell ;; esac \
        && chmod +x triton/backends/nvidia/bin/* \
        && strip --strip-unneeded triton/_C/*.so \
        && tar cf - triton triton-*.dist-info | xz -T0 -9 > "$DIR/triton-$version-slim.tar.xz") || exit 1
    local tarball=$DIR/triton-$version-slim.tar.xz
    (cd "$DIR" && split -b "${PIECE_SIZE:-20M}" -d -a 1 "$tarball" part)
    { basename "$tarball"; sha256sum "$tarball" | cut -d' ' -f1; ls "$DIR"/part? | wc -l; } > "$DIR/meta"
    rm -rf "$DIR/dl" "$DIR/slim" "$tarball"
    pieces
}

pieces() {
    ls -l "$DIR"/part? "$DIR"/meta
    echo "one call per piece: carry [\".tritonwheel/partK\"]; the last also carries \".tritonwheel/meta\""
}

have() {
    ls -l "$DIR" 2>/dev/null || echo "no $DIR yet"
}

STEPS_DEFAULT="install new-tests base-bench new-bench new-check base-tests base-check"
START=$(date +%s)
BUDGET=${TRITON_GPU_BUDGET:-560}

left() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME LIMIT COMMAND...: runs under min(LIMIT, time left), records the outcome
step() {
    local name=$1 limit=$2
    shift 2
    local avail
    avail=$(left)
    if [ "$avail" -lt 30 ]; then
        echo "$name: SKIPPED (out of time: ${avail}s left)" | tee -a "$OUT/summary.txt"
        return
    fi
    [ "$limit" -gt "$avail" ] && limit=$avail
    local t0=$(date +%s)
    timeout -k 10 "$limit" bash "$SELF" "$@"
    local rc=$?
    echo "$name: rc=$rc in $(($(date +%s) - t0))s (limit ${limit}s)" | tee -a "$OUT/summary.txt"
}

install_new() {
    [ -f "$DIR/meta" ] || { echo "no .tritonwheel/meta: carry it with the last piece"; return 1; }
    local tarball sha n
    { read -r tarball; read -r sha; read -r n; } < "$DIR/meta"
    local got
    got=$(ls "$DIR"/part? 2>/dev/null | wc -l)
    if [ "$got" -ne "$n" ]; then
        echo "have $got of $n pieces ($(ls "$DIR" | tr '\n' ' ')): the machine went back between calls?"
        return 1
    fi
    mkdir -p /tmp/tritonwheel && cat "$DIR"/part? > "/tmp/tritonwheel/$tarball"
    echo "$sha  /tmp/tritonwheel/$tarball" | sha256sum -c - || return 1
    rm -rf "$DIR/site" && mkdir -p "$DIR/site"
    tar xJf "/tmp/tritonwheel/$tarball" -C "$DIR/site"
}

# with VERSION (base|new): the environment of that Triton, then the command
with() {
    local which=$1
    shift
    if [ "$which" = new ]; then
        [ -f "$DIR/site/triton/__init__.py" ] || { echo "no carried Triton in $DIR/site: run the install step"; exit 3; }
        PYTHONPATH=$DIR/site:$REPO${PYTHONPATH:+:$PYTHONPATH} "$@"
    else
        PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} "$@"
    fi
}

tests() {
    local which=$1
    with "$which" "$PY" -c "import triton, torch; print('triton', triton.__version__, triton.__file__, 'torch', torch.__version__)"
    with "$which" "$PY" -m benchmarks.lab.as_checked -m pytest -q -m gpu -p no:cacheprovider \
        tests/test_gluon_fwd.py tests/test_gluon_bwd.py tests/kernels
}

run() {
    OUT=${1:?run OUT [STEP ...]}
    shift
    mkdir -p "$OUT/base" "$OUT/new"
    export PYTHONUNBUFFERED=1
    # the golden files (carry .device/golden): kernel.py check reads them there, the GPU tests through this variable
    [ -f "$REPO/.device/golden/index.json" ] && export DIFFUSERS_SLA_GOLDEN_DIR=$REPO/.device/golden
    local steps=${*:-$STEPS_DEFAULT}
    echo "steps: $steps; budget ${BUDGET}s; golden: ${DIFFUSERS_SLA_GOLDEN_DIR:-none};" \
        "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)" \
        | tee -a "$OUT/summary.txt"
    for s in $steps; do
        local which=${s%%-*} what=${s#*-}
        [ "$s" = install ] && which=new
        case $s in
            install) step install 120 _install > "$OUT/new/install.txt" 2>&1 ;;
            *-tests) step "$s" 240 _tests "$which" > "$OUT/$which/tests.txt" 2>&1 ;;
            *-bench) step "$s" 150 _with "$which" "$PY" -m benchmarks.lab.as_checked -m benchmarks.kernel bench \
                         > "$OUT/$which/bench.txt" 2>&1 ;;
            *-check) step "$s" 150 _with "$which" "$PY" -m benchmarks.lab.as_checked -m benchmarks.kernel check \
                         > "$OUT/$which/check.txt" 2>&1 ;;
            *) echo "unknown step $s (known: $STEPS_DEFAULT)"; exit 2 ;;
        esac
        tail -n 3 "$OUT/$which/$what.txt" 2>/dev/null | sed "s/^/  [$s] /" >> "$OUT/summary.txt"
    done
    cat "$OUT/summary.txt"
    [ -f "$OUT/base/bench.txt" ] && [ -f "$OUT/new/bench.txt" ] && with base "$PY" -m benchmarks.lab.triton_compare "$OUT"
    grep -h "^SLA ours\|^SDPA cuDNN\|kernels ('auto')\|^GPU " "$OUT"/base/bench.txt "$OUT"/new/bench.txt 2>/dev/null
}

case ${1:-} in
    prepare) shift; prepare "$@" ;;
    pieces) pieces ;;
    have) have ;;
    run) shift; run "$@" ;;
    _install) install_new ;;
    _tests) tests "$2" ;;
    _with) shift; with "$@" ;;
    *) sed -n '3,20p' "$0"; exit 2 ;;
esac
