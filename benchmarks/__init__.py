"""splitchat's benchmark harness: peer servers, a load generator and the runner (not installed).

Run ``python benchmarks/run.py --help``; see docs/benchmarks.md for the method.
"""
