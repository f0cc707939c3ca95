"""The scripts under benchmarks/ as modules, for tests of their functions (each defines its
flags only when run, so several load into one process)."""
import importlib.util
import pathlib

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / 'benchmarks'


def load(name: str):
  """benchmarks/<name>.py, imported under `name`."""
  spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
