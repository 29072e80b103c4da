"""party_sync's benchmark harness (``make bench``): not part of the product.

See ``bench/run.py`` for the orchestration and ``docs/benchmarks.md`` for the latest figures.
"""
