"""pytest-benchmark of the gate: `pytest bench/kernels/bench_gate.py`.

CPU: the plain-torch reference (the op's CPU path) against the eager sequence, on a small batch.
CUDA (the GPU of --bench-device, see bench/conftest.py): the fused Triton op against the eager
sequence on the 4K tile batch; see gpu_gate_report.py for bandwidth against copy and the JSON
report. Triton is never timed under the interpreter.
"""

from __future__ import annotations

import pytest
import torch
from gate_workload import TILE_CORE, TILES_4K, eager_sequence, gate_bytes, make_inputs

from qairn.kernels import gate

P = 2.0


def run_gate(impl, logit, skip, dec, cores):
    if impl == "eager":
        return eager_sequence(logit, skip, dec, P)
    if impl == "fused_blend":
        return gate.gated_blend(logit, skip, dec, write_gamma=False)
    return gate.gated_blend(logit, skip, dec, p=P, cores=cores, write_gamma=False)


@pytest.mark.parametrize("impl", ["eager", "fused_blend", "fused_pool"])
def test_gate_cpu(benchmark, impl):
    logit, skip, dec = make_inputs(2, 16, 128, 128, torch.float32, "cpu")
    cores = gate.as_cores(torch.tensor([8, 120, 8, 120]), logit)
    benchmark(run_gate, impl, logit, skip, dec, cores)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton path benchmarks need CUDA")
@pytest.mark.skipif(gate.INTERPRETED, reason="TRITON_INTERPRET=1 is set: Triton would be interpreted")
@pytest.mark.parametrize("impl", ["eager", "fused_blend", "fused_pool"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", [16, 64])
def test_gate_cuda(benchmark, gpu, sync, impl, dtype, c):
    n, h, w = TILES_4K
    logit, skip, dec = make_inputs(n, c, h, w, dtype, gpu)
    cores = gate.as_cores(torch.tensor(TILE_CORE), logit)

    def step():
        run_gate(impl, logit, skip, dec, cores)
        sync()

    benchmark.extra_info["bytes_fused"] = gate_bytes(logit, skip)
    benchmark.pedantic(step, warmup_rounds=5, rounds=30)
    if benchmark.stats is not None:  # None with --benchmark-disable: nothing was timed
        benchmark.extra_info["effective_GBps"] = gate_bytes(logit, skip) / benchmark.stats.stats.median / 1e9
