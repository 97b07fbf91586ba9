# call 2 (run from the repo root): what call 1's GPU tests failed on, after the fixes (the Hopper mixed forward's
# test on every block selected, "ratio"'s d proj_bias rounding, a fused layer under torch.compile), then the
# remaining mixed-kernel tests; as many as the session's last device minutes hold
[ -f /tmp/site/diffusers/__init__.py ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
timeout -k 5 ${CALL_BUDGET:-140} python3 -m pytest -q -p no:cacheprovider -rA \
    "tests/test_gluon_fwd.py::test_hopper_kernel_mixes_like_the_portable_kernel" \
    "tests/kernels/test_fusion_kernels.py::test_triton_fusion_matches_the_torch_operator" \
    "tests/kernels/test_fusion_kernels.py::test_fusion_compiles_to_one_graph" \
    "tests/test_gluon_bwd.py::test_hopper_backward_kernel_mixes_like_the_portable_kernel" \
    "tests/kernels/test_fusion_kernels.py::test_gpu_fusion_under_torch_compile" > $OUT/tests.txt 2>&1
echo "rc=$?" >> $OUT/tests.txt
grep -E "^(PASSED|FAILED|ERROR)|rc=|passed|failed|Error:" $OUT/tests.txt | tail -40
