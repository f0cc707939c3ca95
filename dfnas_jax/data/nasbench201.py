"""NAS-Bench-201's published results, read from a JSON table (format: docs/nasbench201_table.md).

`load(path)` checks the whole file and returns a `Table`: one row per cell, with its benchmark
index, its op indices (`dfnas_jax.models.nb201`'s codec) and its CIFAR-10 accuracies in
percent. Stages use it to score the architecture they found against the benchmark's ground
truth (`--config.benchmark_table=PATH`).
"""
import dataclasses
import json
import math
import os
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np

from dfnas_jax.models import nb201

TEST_FIELD = 'cifar10_test_acc_200ep'
VALID_FIELD = 'cifar10_valid_acc_12ep'  # Optional; NaN where absent.
_REQUIRED = ('index', 'arch', TEST_FIELD)
_EXPECTED = ('{"architectures": [{"index": int, "arch": "|op~0|+|op~0|op~1|+|op~0|op~1|op~2|", '
             f'"{TEST_FIELD}": percent, "{VALID_FIELD}": percent (optional)}}, ...]}}')

ArchLike = Union[str, Sequence[int]]


@dataclasses.dataclass(frozen=True, eq=False)
class Table:
  """A loaded NAS-Bench-201 table; row `r` is the file's `r`-th entry.

  Attributes:
    path: The file it was read from.
    description: The file's `description` ('' if it has none).
    source: The file's `source` ('' if it has none).
    indices: [rows] int64, each row's benchmark index.
    archs: Each row's op indices, as `nb201.arch_from_string` gives them.
    test_accuracy: [rows] float64, CIFAR-10 test accuracy (%) after 200 epochs.
    valid_accuracy_12ep: [rows] float64, CIFAR-10 validation accuracy (%) after 12 epochs;
      NaN for entries without one.
  """
  path: str
  description: str
  source: str
  indices: np.ndarray
  archs: Tuple[nb201.Arch, ...]
  test_accuracy: np.ndarray
  valid_accuracy_12ep: np.ndarray
  _rows: Dict[nb201.Arch, int] = dataclasses.field(repr=False)

  def __len__(self) -> int:
    return len(self.archs)

  def row(self, arch: ArchLike) -> int:
    """The row of `arch`, an op-index sequence or a benchmark string.

    Raises:
      ValueError: `arch` is not a NAS-Bench-201 cell (the codec's message).
      KeyError: `arch` is a cell this table lacks.
    """
    ops = _ops(arch)
    try:
      return self._rows[ops]
    except KeyError:
      raise KeyError(f'{nb201.arch_to_string(ops)!r} is not in the NAS-Bench-201 table '
                     f'{self.path} ({len(self)} architectures).') from None

  def __contains__(self, arch: ArchLike) -> bool:
    """Whether the table has `arch` (a table may hold some cells only); ValueError when
    `arch` is not a NAS-Bench-201 cell, as `row`."""
    return _ops(arch) in self._rows

  def test_accuracy_of(self, arch: ArchLike) -> float:
    """200-epoch CIFAR-10 test accuracy (%) of `arch`."""
    return float(self.test_accuracy[self.row(arch)])

  def rank(self, arch: ArchLike) -> int:
    """1 + the number of rows with a strictly higher test accuracy: 1 is the best, and tied
    rows share the better rank (two best rows are both 1, the next is 3)."""
    return 1 + int(np.count_nonzero(self.test_accuracy > self.test_accuracy[self.row(arch)]))

  def best(self) -> int:
    """The row with the highest test accuracy (the first such row on a tie)."""
    return int(np.argmax(self.test_accuracy))

  def sample(self, count: int, seed: int) -> List[int]:
    """`count` distinct rows drawn uniformly at random, a function of `seed` alone.

    It is `np.random.default_rng(seed).choice(len(self), count, replace=False)`.
    """
    if not 0 <= count <= len(self):
      raise ValueError(f'Can sample 0 to {len(self)} distinct rows of the NAS-Bench-201 '
                       f'table {self.path}, not {count}.')
    rng = np.random.default_rng(seed)
    return [int(r) for r in rng.choice(len(self), size=count, replace=False)]

  def summary_entry(self, arch: ArchLike) -> Dict[str, Any]:
    """JSON-ready facts about `arch` for a stage's summary.json."""
    row = self.row(arch)
    return {
        'benchmark_string': nb201.arch_to_string(self.archs[row]),
        'benchmark_index': int(self.indices[row]),
        'benchmark_test_accuracy': float(self.test_accuracy[row]),
        'benchmark_rank': self.rank(self.archs[row]),
        'benchmark_size': len(self),
        'benchmark_best_test_accuracy': float(self.test_accuracy[self.best()]),
    }


def _ops(arch: ArchLike) -> nb201.Arch:
  return nb201.arch_from_string(arch) if isinstance(arch, str) else nb201.check(arch)


def _accuracy(value: Any, field: str, position: int, path: str) -> float:
  # bool is an int to Python, but `true` in a table is a mistake, not 1%.
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f'NAS-Bench-201 table {path}: entry {position} has a non-numeric '
                     f'{field!r} ({value!r}); expected a percentage in [0, 100].')
  if not 0 <= value <= 100:  # Also catches NaN, which Python's json accepts.
    raise ValueError(f'NAS-Bench-201 table {path}: entry {position} has {field!r} {value!r}, '
                     'outside [0, 100]; expected a percentage.')
  return float(value)


def load(path: Union[str, os.PathLike]) -> Table:
  """Reads and checks a NAS-Bench-201 table.

  Args:
    path: A JSON file in the format of docs/nasbench201_table.md.

  Returns:
    The table, its rows in the file's order.

  Raises:
    ValueError: The file is missing, is not such a table, or is empty; the message names the
      path and, for a bad entry, its position (0-based) in `architectures`.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f'NAS-Bench-201 table {path} does not exist'
                     + (' as a file.' if os.path.exists(path) else '.'))
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    data = json.loads(raw)
  except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError on binary files.
    raise ValueError(f'NAS-Bench-201 table {path} is not JSON ({e}); expected {_EXPECTED}.'
                     ) from None
  entries = data.get('architectures') if isinstance(data, dict) else None
  if not isinstance(entries, list):
    raise ValueError(f"NAS-Bench-201 table {path} has no 'architectures' list; expected "
                     f'{_EXPECTED}.')
  if not entries:
    raise ValueError(f'NAS-Bench-201 table {path} has no architectures; expected {_EXPECTED}.')

  indices, archs, test, valid = [], [], [], []
  rows: Dict[nb201.Arch, int] = {}
  index_rows: Dict[int, int] = {}
  for position, entry in enumerate(entries):
    if not isinstance(entry, dict):
      raise ValueError(f'NAS-Bench-201 table {path}: entry {position} is {entry!r}, not an '
                       f'object; expected {_EXPECTED}.')
    missing = [k for k in _REQUIRED if k not in entry]
    if missing:
      raise ValueError(f'NAS-Bench-201 table {path}: entry {position} lacks '
                       f'{", ".join(map(repr, missing))}; expected {_EXPECTED}.')
    index = entry['index']
    if isinstance(index, bool) or not isinstance(index, int) or not (
        0 <= index < nb201.NUM_ARCHITECTURES):
      raise ValueError(f"NAS-Bench-201 table {path}: entry {position} has 'index' {index!r}; "
                       f'expected a benchmark index, an integer in [0, '
                       f'{nb201.NUM_ARCHITECTURES}).')
    if index in index_rows:
      raise ValueError(f'NAS-Bench-201 table {path}: entries {index_rows[index]} and '
                       f'{position} both have index {index}; each index must appear once.')
    text = entry['arch']
    if not isinstance(text, str):
      raise ValueError(f"NAS-Bench-201 table {path}: entry {position} has 'arch' {text!r}; "
                       "expected the benchmark's string '|op~0|+|op~0|op~1|+|op~0|op~1|op~2|'.")
    try:
      ops = nb201.arch_from_string(text)
    except ValueError as e:
      raise ValueError(f'NAS-Bench-201 table {path}: entry {position}: {e}') from None
    if ops in rows:
      raise ValueError(f'NAS-Bench-201 table {path}: entries {rows[ops]} and {position} are '
                       f'both {text!r}; each architecture must appear once.')
    test.append(_accuracy(entry[TEST_FIELD], TEST_FIELD, position, path))
    value = entry.get(VALID_FIELD)
    valid.append(math.nan if value is None else _accuracy(value, VALID_FIELD, position, path))
    rows[ops] = index_rows[index] = position
    indices.append(index)
    archs.append(ops)

  def frozen(values, dtype):
    array = np.array(values, dtype)
    array.flags.writeable = False  # The table is shared by every lookup; keep it intact.
    return array

  return Table(path=path, description=str(data.get('description', '')),
               source=str(data.get('source', '')), indices=frozen(indices, np.int64),
               archs=tuple(archs), test_accuracy=frozen(test, np.float64),
               valid_accuracy_12ep=frozen(valid, np.float64), _rows=rows)
