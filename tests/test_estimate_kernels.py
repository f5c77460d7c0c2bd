"""The estimator mirrors kernel-dispatch constants instead of importing Triton: they agree."""


def test_dequant_switch_matches_the_kernels():
    from quant_kernels import triton_wq
    from quantrt.estimate import memory

    assert memory.DEQUANT_GEMM_MIN_M == triton_wq.DEQUANT_GEMM_MIN_M
