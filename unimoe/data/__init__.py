"""Data pipeline: manifests, importers, tokenisation to shards, datasets, samplers, demo corpus.

Submodules are imported on demand (``from unimoe.data.manifest import read_manifest``) so
that reading a manifest does not pull in torch or Lightning.
"""
