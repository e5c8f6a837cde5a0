"""Benchmarks. Run each from the repository root as a module, e.g. `python -m bench.tokenize`
(a module path keeps bench/ off sys.path, where bench/tokenize.py would shadow the stdlib's)."""
