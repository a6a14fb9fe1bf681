"""`aigc-dist demo`: the whole pipeline on one machine (pipeline.py), its report, and the synthetic world it
generates for (world.py: the catalog, users, copy corpus and quality rules that tests and benchmarks use too).

Nothing is imported here, so that the world can be used without the pipeline's Ray and training imports.
"""
