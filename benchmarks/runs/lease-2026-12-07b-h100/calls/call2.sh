# call 2 (run from the repo root, same warm machine as call 1): Wan2.1-1.3B end to end, eager, dense against SLA's
# sum and fusion "mass" at topk 5 % (forward, train step, in-model split)
[ -f /tmp/site/diffusers/__init__.py ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
timeout -k 5 ${CALL_BUDGET:-540} python3 -m benchmarks.e2e_wan --topk 0.05 --fusion sla mass --repeat 3 \
    > $OUT/e2e-fusion.txt 2>&1
echo "rc=$?" >> $OUT/e2e-fusion.txt
tail -32 $OUT/e2e-fusion.txt
