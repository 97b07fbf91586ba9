# call A: the fusion study's teacher (4K) and as many rows as fit; the rest resume in call C
source "$(dirname "$0")/common.sh"
{
stamp start; nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
python3 -c "import torch, triton, diffusers; print(torch.__version__, triton.__version__, diffusers.__version__)"
stamp "teacher 4k"; study_env python3 -m benchmarks.quality teacher --length 4k --out $Q/fz --time-budget-s 120 2>&1 | tail -14
stamp "tune 4k"; tune_parallel $Q/fz 4k $(( ${CALL_BUDGET:-540} - ($(date +%s) - T0) - 15 )) $ROWS
stamp done
} > $OUT/callA.log 2>&1
pack; tail -40 $OUT/callA.log
