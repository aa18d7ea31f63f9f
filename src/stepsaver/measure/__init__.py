"""Measure: quality and cost instruments."""
