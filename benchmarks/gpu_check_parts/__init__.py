"""The parts of benchmarks/gpu_check.py, one module each, and what they share (common).

Each part module has ``run(part_run)``: it measures, records figures and decides its checks
(pass / fail / skip, each with a reason) on a :class:`common.PartRun`. The driver
(benchmarks/gpu_check.py) runs every part in its own process under a time limit and merges
their records into one report. The parts call the project's own code (pipeline/, models/ and
the benchmark scripts' functions); they re-implement none of it.
"""
