"""`aigc-dist demo`: the whole pipeline on one machine, and a report (see pipeline.py)."""

from aigc_dist.demo.pipeline import run_demo

__all__ = ["run_demo"]
