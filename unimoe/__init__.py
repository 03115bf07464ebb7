"""unimoe: train UniMoE-Audio style unified speech and music generators."""

__version__ = "0.1.0"
