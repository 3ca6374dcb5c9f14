"""benchmarks.bench_flops.gemm_peak: the share-of-peak figures of bench_flops and bench_engines divide by the better
of two GEMM libraries, so one library that under-reaches the machine (MKL on AMD) cannot make an engine look >100%."""
import torch

from benchmarks.bench_flops import gemm_peak


def test_gemm_peak_is_the_better_of_torch_and_onnxruntime(monkeypatch):
    from benchmarks import bench_flops
    got = gemm_peak([128], reps=1)
    assert got["torch"] > 0 and got["onnxruntime"] > 0, got
    assert got["peak"] == max(got["torch"], got["onnxruntime"])
    # a torch that under-reaches: the peak is MLAS's, not torch's
    monkeypatch.setattr(bench_flops, "matmul_flops", lambda sizes, reps: 1.0)
    assert bench_flops.gemm_peak([128], reps=1)["peak"] > 1.0
    # across rounds the best of each library is kept
    kept = bench_flops.gemm_peak([128], reps=1, best={"torch": 1e15, "onnxruntime": 0.0, "peak": 1e15})
    assert kept["torch"] == 1e15 and kept["peak"] == 1e15 and kept["onnxruntime"] > 0


def test_onnxruntime_peak_runs_on_the_threads_asked(monkeypatch):
    """ONNX Runtime's MatMul is timed on torch's thread count, like the engines it is compared with."""
    import onnxruntime as ort
    seen = []
    real = ort.InferenceSession

    def spy(model, so, **kw):
        seen.append(so.intra_op_num_threads)
        return real(model, so, **kw)
    monkeypatch.setattr(ort, "InferenceSession", spy)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gemm_peak([64], reps=1)
    finally:
        torch.set_num_threads(old)
    assert seen == [1]
