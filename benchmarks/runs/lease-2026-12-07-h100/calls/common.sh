# sourced by each call: diffusers from the carried wheel, the repo first on PYTHONPATH
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -f /tmp/site/diffusers/__init__.py ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 SLA_REFERENCE_PATH=$PWD/.device/sla_ref
[ -f .device/golden/index.json ] && export DIFFUSERS_SLA_GOLDEN_DIR=$PWD/.device/golden
Q=.quality-cache/runs
mkdir -p $Q
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
# the study's rows run on the portable kernels, as the earlier runs did: the same kernels for every row and length
study_env() { DIFFUSERS_SLA_FWD_KERNEL=portable DIFFUSERS_SLA_BWD_KERNEL=portable "$@"; }
# tune SEED-folders in parallel (one process per seed: the small model leaves the GPU mostly idle)
tune_parallel() {  # FOLDER LENGTH BUDGET VARIANTS...
    local folder=$1 length=$2 budget=$3; shift 3
    for s in 0 1 2; do
        mkdir -p $folder-s$s
        [ -f $folder-s$s/quality.json ] || cp $folder/quality.json $folder/samples.pt $folder-s$s/
        study_env python3 -m benchmarks.quality tune --length $length --out $folder-s$s --seeds $s --variants "$@" \
            --time-budget-s $budget >> $folder-s$s.log 2>&1 &
    done
    wait
    tail -n 30 $folder-s0.log $folder-s1.log $folder-s2.log
}
pack() { tar czf $OUT/quality_runs.tgz -C .quality-cache runs; }
ROWS="full sla_5 sparse_5 mass_5 ratio_5 sla_3 sparse_3 mass_3 ratio_3"
