source "$(dirname "$0")/common.sh"
{
stamp start; nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
unset DIFFUSERS_SLA_FWD_KERNEL DIFFUSERS_SLA_BWD_KERNEL; smoke_or_fallback; export DIFFUSERS_SLA_FWD_KERNEL=portable DIFFUSERS_SLA_BWD_KERNEL=portable
stamp "teacher 4k"; python3 -m benchmarks.quality teacher --length 4k --out $Q/f4k --time-budget-s 120 2>&1 | tail -12
stamp "teacher 16k (from the 4K teacher) beside the 4K fusion rows"
python3 -m benchmarks.quality teacher --length 16k --out $Q/q16k --init-from 4k --time-budget-s 150 > $Q/q16k-teacher.log 2>&1 &
tune_parallel $Q/f4k 4k 195 full sla_5 sparse_5 mass_5 ratio_5
wait; tail -12 $Q/q16k-teacher.log
stamp "tune 16k"; tune_parallel $Q/q16k 16k 215 full sla_5 sparse_5 sla_10 sparse_10 linear_only
stamp done
} > $OUT/call1.log 2>&1
pack; tail -60 $OUT/call1.log
