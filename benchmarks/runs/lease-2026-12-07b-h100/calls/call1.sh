# call 1 (run from the repo root): the fusions' epilogue mix and the rest-mass kernels on the GPU, then the kernel
# bench (the "mass" / "ratio" rows and the breakdown's mixed and rest-mass rows). `kernel.py check` is left to a
# later lease: the session's device time after failed machine starts held the tests and the bench only.
[ -f /tmp/site/diffusers/__init__.py ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 SLA_REFERENCE_PATH=$PWD/.device/sla_ref
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
step() {  # NAME LIMIT_S COMMAND...: one step's log in $OUT/NAME.txt, its status in the summary
    local name=$1 limit=$2; shift 2
    stamp "start $name" | tee -a $OUT/summary.txt
    timeout $limit "$@" > $OUT/$name.txt 2>&1
    stamp "$name: rc=$?" | tee -a $OUT/summary.txt
    tail -n 4 $OUT/$name.txt | tee -a $OUT/summary.txt
}
{ nvidia-smi --query-gpu=name --format=csv,noheader
  python3 -c "import torch, triton, diffusers; print(torch.__version__, triton.__version__, diffusers.__version__)"; } \
    > $OUT/summary.txt 2>&1
step fusion-tests 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_fusion_kernels.py \
    tests/kernels/test_rest_mass_kernels.py
step bench 170 python3 -m benchmarks.kernel bench --out $OUT/bench
step gpu-tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gluon_fwd.py tests/test_gluon_bwd.py \
    tests/kernels
cat $OUT/summary.txt
