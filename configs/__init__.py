"""The stage configs: one `get_config(preset)` per stage, and the blocks they share.

Run one with `python -m dfnas_jax.main --config=configs/<stage>.py[:preset]`. The folder
installs as `dfnas_jax.configs` (pyproject.toml), so configs import each other, and tests,
benchmarks and notebooks import them, from any working directory.
"""
