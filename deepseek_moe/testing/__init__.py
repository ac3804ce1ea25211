"""Helpers for testing code built on this package (shipped with it, like `olmo_core.testing`):
`distributed.run_distributed(fn, world_size)` runs `fn` in gloo CPU processes."""
