# call C: the fusion rows left from call A (background) beside the correctness runs on both Tritons (golden carried)
source "$(dirname "$0")/common.sh"
B=${CALL_BUDGET:-540}
{ stamp "tune 4k (resume)"; tune_parallel $Q/fz 4k $(( B - 40 )) $ROWS; stamp done; } > $OUT/callC.log 2>&1 &
TRITON_GPU_BUDGET=$(( B - 30 )) bash benchmarks/lab/triton_gpu.sh run $OUT/tr new-check base-check new-tests base-tests > $OUT/triton.log 2>&1
wait
pack; cat $OUT/triton.log; tail -40 $OUT/callC.log
