# sourced by each call: diffusers from the carried wheel, the repo first on PYTHONPATH
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -f /tmp/site/diffusers/__init__.py ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
# the study's rows ran on the portable kernels (as the 4K run): the same kernels for every row and length
export DIFFUSERS_SLA_FWD_KERNEL=portable DIFFUSERS_SLA_BWD_KERNEL=portable
Q=.quality-cache/runs
mkdir -p $Q
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
# tune SEED-folders in parallel (one process per seed: the small model leaves the GPU mostly idle)
tune_parallel() {  # FOLDER LENGTH BUDGET VARIANTS...
    local folder=$1 length=$2 budget=$3; shift 3
    for s in 0 1 2; do
        mkdir -p $folder-s$s
        [ -f $folder-s$s/quality.json ] || cp $folder/quality.json $folder/samples.pt $folder-s$s/
        python3 -m benchmarks.quality tune --length $length --out $folder-s$s --seeds $s --variants "$@" \
            --time-budget-s $budget > $folder-s$s.log 2>&1 &
    done
    wait
    cat $folder-s0.log $folder-s1.log $folder-s2.log
}
pack() { tar czf $OUT/quality_runs.tgz -C .quality-cache runs; }
# the refactored kernels' first GPU run: if the smoke check fails, the study runs on the pre-refactor package
smoke_or_fallback() {
    if timeout 120 python3 gpu_plan/smoke.py; then echo "smoke: current tree OK"; else
        echo "smoke: FAILED, falling back to the pre-refactor package (.device/old)"
        rm -rf diffusers_sla && cp -r .device/old/diffusers_sla . ; fi
}
