"""zembed engines: the runtime (socket, heartbeats, batching) and the models it serves."""

if __name__ != "zembed.engines":  # the folder is installed as zembed.engines only (setup.cfg)
    raise ImportError(f"import zembed.engines, not {__name__}: the folder engines/ is "
                      "the package zembed.engines (setup.cfg's package_dir)")

