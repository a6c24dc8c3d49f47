"""The benchmark suites that `python -m experiments.benchmark --suites=...` runs besides its own
(each also runs alone: `python -m experiments.benchmarks.NAME`): cnn, forward, metabatch, online;
and `report`, the report every suite writes."""
