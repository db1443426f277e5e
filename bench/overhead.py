"""Splits pymeta's time at the target shapes into kernel time and per-call overhead.

    python bench/overhead.py [--min-time SEC]

For each case of the "targets" suite, times (interleaved, medians, as ``pymeta.benchmark``
does) the public op and the raw ``pymeta._C`` kernels run on preallocated buffers. The
difference is everything around the kernels: argument checks, output allocation (and its
page faults), autograd bookkeeping and the backward engine.
"""
import argparse

import torch

from pymeta import _C, benchmark

F32 = 0  # dtype code of csrc/common.h


def _dev():
    return -1, 0, torch.get_num_threads()


def _pairwise_raw(key, backward):
    T, Q, N, D = key
    x, y, g = torch.randn(T, Q, D), torch.randn(T, N, D), torch.randn(T, Q, N)
    out, gx, gy = torch.empty(T, Q, N), torch.empty_like(x), torch.empty_like(y)

    def raw():
        _C.pairwise_distances_forward(*_dev(), F32, 0, *key, x.data_ptr(), y.data_ptr(),
                                      out.data_ptr())
        if backward:
            _C.pairwise_distances_backward(*_dev(), F32, 0, *key, g.data_ptr(), x.data_ptr(),
                                           y.data_ptr(), out.data_ptr(), gx.data_ptr(),
                                           gy.data_ptr())
    return raw


def _prototypes_raw(key, backward):
    T, N, K, D = key
    z, g = torch.randn(T, N * K, D), torch.randn(T, N, D)
    labels = torch.arange(N).repeat_interleave(K).expand(T, -1).contiguous()
    out, gz = torch.empty(T, N, D), torch.empty_like(z)

    def raw():
        _C.class_prototypes_forward(*_dev(), F32, T, N * K, N, D, z.data_ptr(), labels.data_ptr(),
                                    out.data_ptr(), True)
        if backward:
            _C.class_prototypes_backward(*_dev(), F32, T, N * K, N, D, g.data_ptr(),
                                         labels.data_ptr(), gz.data_ptr())
    return raw


def _sgd_raw(key, _):
    T, layout = key
    tasks = 1 if layout == "single" else T
    desc = []
    keep = []
    for shape in benchmark.conv4_shapes():
        p = torch.randn(*((T,) if layout == "stacked" else ()), *shape)
        g, out = torch.randn(tasks, *shape), torch.empty(tasks, *shape)
        M = g[0].numel()
        desc += [out.data_ptr(), p.data_ptr(), g.data_ptr(), 0,
                 M if layout == "stacked" else 0, M, 0, 0, M]
        keep += [p, g, out]
    return lambda: (keep, _C.sgd_step(*_dev(), F32, tasks, benchmark.LR, desc))


RAW = {"pairwise_distances": _pairwise_raw, "class_prototypes": _prototypes_raw,
       "sgd_step": _sgd_raw}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-time", type=float, default=0.3, metavar="SEC")
    args = parser.parse_args()
    print(f"threads {torch.get_num_threads()}; median us per call")
    print(f"{'op':18} {'case':22} {'mode':9} {'public':>9} {'raw _C':>9} {'overhead':>9}")
    for op, key, mode in benchmark.TARGETS:
        torch.manual_seed(benchmark.SEED)
        with torch.set_grad_enabled(mode != "fwd"):
            public = benchmark.build_case(op, key, mode, "cpu")[0]["pymeta"]
            raw = RAW[op](key, mode == "fwd+bwd")
            t = benchmark.measure({"public": public, "raw": raw}, args.min_time)
        pub, kern = t["public"] * 1e6, t["raw"] * 1e6
        print(f"{op:18} {benchmark.case_label(op, key):22} {mode:9} {pub:9.1f} {kern:9.1f} "
              f"{pub - kern:9.1f} ({(pub - kern) / pub:.0%})")


if __name__ == "__main__":
    main()
