"""peak.py — the matmul peak the model-FLOP-utilisation figures of the benchmarks divide by:
torch's own GEMM (2048 x 2048 x 2048, the dtype of the run) on the same number of threads as the
benchmarked job, measured in the same run, best of a few repetitions. On this machine's cores
bf16 runs ~4x fp32 (AVX512-BF16), so each dtype is measured against its own peak.

    from peak import matmul_peak_gflops, mfu
    peak = matmul_peak_gflops("bf16", threads=2)
    print(mfu(6 * params * tokens_per_s, peak))
"""
import time


def matmul_peak_gflops(dtype: str, threads: int, n: int = 2048, reps: int = 5) -> float:
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g).to(dt)
        b = torch.randn(n, n, generator=g).to(dt)
        torch.mm(a, b)  # warm-up (oneDNN picks and builds its kernel)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        return 2 * n**3 / best / 1e9
    finally:
        torch.set_num_threads(old)


def mfu(model_gflops: float, peak_gflops: float) -> float:
    """Model FLOP utilisation, percent."""
    return 100.0 * model_gflops / peak_gflops
