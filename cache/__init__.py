"""Embedding cache: the BF16 vector codec now, keys and Redis storage as the cache lands."""
