"""The estimator mirrors kernel-dispatch constants instead of importing Triton: they agree."""


def test_dequant_switch_matches_the_kernels():
    from quant_kernels import triton_wq
    from quantrt.estimate import memory

    from quant_kernels import triton_wq_gemv

    assert memory.DENSE_FROM_M == triton_wq.DENSE_FROM_M == triton_wq_gemv.SWAP_MAX_M + 1
