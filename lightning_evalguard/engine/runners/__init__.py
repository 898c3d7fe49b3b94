"""Runners execute evaluation jobs: inline (on the caller's thread), stream (a background thread,
on a side CUDA stream when on GPU), subprocess (a persistent, hard-killable worker process)."""
