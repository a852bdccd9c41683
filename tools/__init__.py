"""Operator tools: load generator and dashboards (grow with the bench and stats issues)."""

if __name__ != "zembed.tools":  # the folder is installed as zembed.tools only (setup.cfg)
    raise ImportError(f"import zembed.tools, not {__name__}: the folder tools/ is "
                      "the package zembed.tools (setup.cfg's package_dir)")

