"""Operator tools: load generator and dashboards (grow with the bench and stats issues)."""
