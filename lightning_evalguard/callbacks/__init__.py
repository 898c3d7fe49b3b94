"""Thin Lightning adapters over the engine, one callback per module."""
