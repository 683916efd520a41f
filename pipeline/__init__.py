"""Prep stage: raw images -> sharded Zarr store + manifest."""
