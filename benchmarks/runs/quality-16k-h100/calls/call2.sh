# the second call of the lease, run as one command line from the repository root
source gpu_plan/common.sh; { tune_parallel $Q/f4k 4k 130 mass_5 ratio_5 sparse_5 > $Q/f4k-c2.log 2>&1 & tune_parallel $Q/q16k 16k 100 linear_only; wait; cat $Q/f4k-c2.log; } > $OUT/call2.log 2>&1; pack
