# call B: the newer Triton assembled from its pieces; kernel bench on both Tritons, then the eager end-to-end table
source "$(dirname "$0")/common.sh"
TRITON_GPU_BUDGET=${TRITON_BUDGET:-320} bash benchmarks/lab/triton_gpu.sh run $OUT/tr install base-bench new-bench > $OUT/triton.log 2>&1
left=$(( ${CALL_BUDGET:-560} - ($(date +%s) - T0) - 10 ))
stamp "e2e eager, ${left}s left" > $OUT/e2e.txt
timeout -k 5 $left python3 -m benchmarks.e2e_wan >> $OUT/e2e.txt 2>&1
stamp "e2e rc=$?" >> $OUT/e2e.txt
cat $OUT/triton.log; tail -30 $OUT/e2e.txt
