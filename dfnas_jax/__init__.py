"""Data-Free Neural Architecture Search in JAX/Flax."""
