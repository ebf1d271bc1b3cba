"""Speed and memory benchmarks of SGD, SAM and mSAM (``msam bench``, ``python -m msam.bench``).

* :mod:`msam.bench.workloads`: models with synthetic batches, the methods and their steps.
* :mod:`msam.bench.runner`: interleaved timing (round-robin, shuffled order) and statistics.
* :mod:`msam.bench.memory`: peak memory of a step (CPU via torch.profiler, CUDA via
  ``max_memory_allocated``).
* :mod:`msam.bench.report`: ``bench.json``, ``bench.md`` and ``bench.png``.
* :mod:`msam.bench.cli`: the command line (``add_arguments`` / ``run``).
"""

from msam.bench.memory import measure_step_memory, tensor_bytes
from msam.bench.runner import ModelPlan, quantiles, run_model
from msam.bench.workloads import Method, Workload, build_workload, make_methods, make_stepper

__all__ = [
    "Method", "ModelPlan", "Workload", "build_workload", "make_methods", "make_stepper",
    "measure_step_memory", "quantiles", "run_model", "tensor_bytes",
]
