"""Benchmarks of gradicon_fast: every op on every backend against the PyTorch reference.

    python -m benchmarks --sizes tiny            # CI-sized smoke run
    python -m benchmarks --sizes lung --markdown # the lung-scale table of BENCHMARKS.md
    python -m benchmarks.report --markdown       # rebuild BENCHMARKS.md's table from results/*.json
    pytest benchmarks/                           # the same ops under pytest-benchmark

Modules: ``cases`` (ops, sizes, inputs), ``measure`` (timing, memory, bandwidth), ``memprobe``
(the CPU peak-RSS subprocess), ``environment`` (machine description), ``report`` (tables),
``runner`` (the command line). The method is described in BENCHMARKS.md.
"""
