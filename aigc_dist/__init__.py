"""aigc-dist: train content generators on Ray + DeepSpeed and generate personalized content at scale."""

__version__ = "0.1.0"
