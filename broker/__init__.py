"""The zembed broker: frontend ROUTER for clients, backend ROUTER for engines, one poll loop."""

if __name__ != "zembed.broker":  # the folder is installed as zembed.broker only (setup.cfg)
    raise ImportError(f"import zembed.broker, not {__name__}: the folder broker/ is "
                      "the package zembed.broker (setup.cfg's package_dir)")

