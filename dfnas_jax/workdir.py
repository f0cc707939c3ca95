"""Files a stage leaves in its work directory, written atomically (temp + rename)."""
import json
import os
import time
from typing import Any, Dict

import flax.serialization
import jax
import numpy as np


def atomic_write_bytes(path: str, data: bytes) -> None:
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  text = json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + '\n'
  atomic_write_bytes(path, text.encode())


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _jsonable(x):
  if isinstance(x, (np.generic, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f'{type(x).__name__} is not JSON serializable')


def write_summary(workdir: str, summary: Dict[str, Any]) -> str:
  """Writes the stage's headline results to `workdir/summary.json` (the stage contract)."""
  if jax.process_index() != 0:
    return os.path.join(workdir, 'summary.json')
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'summary.json')
  write_json(path, summary)
  return path


class Stopwatch:
  """Seconds a resumable phase has spent on the work it keeps, over every process that
  worked on it: `mark(step)` records the total when `step` is checkpointed, and a process
  that resumes from a step starts from the total marked at or before it."""

  def __init__(self, directory: str, resumed_step: int = 0):
    self.path = os.path.join(directory, 'wall_time.json')
    marks = read_json(self.path) if resumed_step and os.path.exists(self.path) else {}
    self._marks = {k: v for k, v in marks.items() if int(k) <= resumed_step}
    self._before = self._marks[max(self._marks, key=int)] if self._marks else 0.0
    self._start = time.time()

  def seconds(self) -> float:
    return self._before + time.time() - self._start

  def mark(self, step: int) -> None:
    self._marks[str(step)] = round(self.seconds(), 2)
    if jax.process_index() == 0:
      write_json(self.path, self._marks)


def save_variables(path: str, variables: Dict[str, Any]) -> None:
  """Model variables ({'params', 'batch_stats'}) as msgpack."""
  atomic_write_bytes(path, flax.serialization.msgpack_serialize(jax.device_get(variables)))


def load_variables(path: str) -> Dict[str, Any]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Model variables file not found: {path}')
  with open(path, 'rb') as f:
    try:
      return flax.serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several unrelated types on garbage.
      raise ValueError(f'{path} is not a msgpack file of model variables ({e}).') from e
