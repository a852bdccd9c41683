"""Embedding cache: the BF16 vector codec now, keys and Redis storage as the cache lands."""

if __name__ != "zembed.cache":  # the folder is installed as zembed.cache only (setup.cfg)
    raise ImportError(f"import zembed.cache, not {__name__}: the folder cache/ is "
                      "the package zembed.cache (setup.cfg's package_dir)")

