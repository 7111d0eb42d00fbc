"""Datasets, split protocols, joint transforms and box encodings."""
