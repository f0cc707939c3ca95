"""Step-level before/after of a layer change: compare_torch.py's rows' JAX steps, built and
compiled once per variant of the layer, timed interleaved in one process (the machine's load
moves all variants alike). Used by benchmarks/batch_norm.py and pointwise_conv.py.
"""
import contextlib
import time
from typing import Callable, Dict, Sequence

import numpy as np


def median_ms(calls: Dict[str, Callable[[int], object]], repeats: int) -> Dict[str, float]:
  """Median ms per call of each of `calls` (name -> fn(i)), calls alternating."""
  ms = {name: [] for name in calls}
  for i in range(repeats):
    for name, call in calls.items():
      start = time.perf_counter()
      call(i)
      ms[name].append((time.perf_counter() - start) * 1e3)
  return {name: float(np.median(t)) for name, t in ms.items()}


@contextlib.contextmanager
def patched(owner, attribute: str, value):
  """`owner.attribute = value` while the block runs (a step traces what it finds there)."""
  saved = getattr(owner, attribute)
  setattr(owner, attribute, value)
  try:
    yield
  finally:
    setattr(owner, attribute, saved)


def time_rows(names: Sequence[str],
              variants: Dict[str, Callable[[], contextlib.AbstractContextManager]],
              repeats: int):
  """Prints, per row, each variant's median JAX step time and the first variant's over each
  other's. `variants` maps a name to a context manager factory in force while the row's step
  is built and compiled."""
  import compare_torch  # pylint: disable=import-outside-toplevel  # benchmarks/; imports torch
  for row in names:
    calls = {}
    for name, variant in variants.items():
      with variant():
        bench = compare_torch.ROWS[row]()
        timers = bench.timers(repeats + 1) if getattr(bench, 'draws_paths', False) else (
            bench.timers())
        jax_call = timers[0]
        start = time.perf_counter()
        jax_call(0)  # traces and compiles with this variant
        print(f'{row}, {name}: first call (compilation) {time.perf_counter() - start:.0f} s',
              flush=True)
      calls[name] = lambda i, call=jax_call: call(i + 1)
    ms = median_ms(calls, repeats)
    first, *others = variants
    print(f'{row}: ' + ', '.join(f'{name} {t:.1f} ms' for name, t in ms.items()) + ''.join(
        f'; {first} / {other} {ms[first] / ms[other]:.2f}' for other in others), flush=True)
