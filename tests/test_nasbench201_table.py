import itertools
import json
import math
import re
import time

import numpy as np
import pytest

from dfnas_jax.data import nasbench201
from dfnas_jax.models import nb201

# A few cells, in an order unlike the benchmark's, with indices unlike their positions.
ARCHS = [(3, 3, 3, 1, 3, 2), (0, 0, 0, 0, 0, 0), (1, 2, 3, 4, 0, 1), (4, 4, 4, 4, 4, 4),
         (2, 2, 2, 2, 2, 2)]
INDICES = [6111, 7, 3, 15624, 0]
TEST = [94.37, 10.0, 85.5, 60.25, 91.0]
VALID = [84.9, 10.0, 70.1, 40.0, 80.0]


def entries(archs=ARCHS, test=TEST, valid=VALID, indices=None):
  indices = INDICES if indices is None else indices
  return [{'index': i, 'arch': nb201.arch_to_string(a), nasbench201.TEST_FIELD: t,
           nasbench201.VALID_FIELD: v} for i, a, t, v in zip(indices, archs, test, valid)]


def write(tmp_path, data, name='table.json'):
  path = tmp_path / name
  path.write_text(data if isinstance(data, str) else json.dumps(data))
  return str(path)


def table_of(tmp_path, architectures, **extra):
  return nasbench201.load(write(tmp_path, {'description': 'tiny', 'source': 'tests',
                                           'architectures': architectures, **extra}))


def test_load_holds_every_field_in_file_order(tmp_path):
  table = table_of(tmp_path, entries())
  assert len(table) == 5
  assert table.path == str(tmp_path / 'table.json')
  assert (table.description, table.source) == ('tiny', 'tests')
  assert table.archs == tuple(ARCHS)
  np.testing.assert_array_equal(table.indices, INDICES)
  np.testing.assert_array_equal(table.test_accuracy, TEST)
  np.testing.assert_array_equal(table.valid_accuracy_12ep, VALID)
  assert table.indices.dtype == np.int64 and table.test_accuracy.dtype == np.float64
  with pytest.raises(ValueError):  # read-only: lookups share these arrays
    table.test_accuracy[0] = 0.0


def test_row_takes_op_tuples_sequences_and_strings(tmp_path):
  table = table_of(tmp_path, entries())
  for row, arch in enumerate(ARCHS):
    assert table.row(arch) == row
    assert table.row(list(arch)) == row
    assert table.row(np.array(arch)) == row
    assert table.row(nb201.arch_to_string(arch)) == row
    assert table.test_accuracy_of(nb201.arch_to_string(arch)) == TEST[row]


def test_a_cell_not_in_the_table_is_a_key_error_naming_it_and_the_path(tmp_path):
  table = table_of(tmp_path, entries())
  absent = (1, 1, 1, 1, 1, 1)
  text = re.escape(nb201.arch_to_string(absent))
  path = re.escape(table.path)
  with pytest.raises(KeyError, match=f'{text}.* is not in the NAS-Bench-201 table {path}'):
    table.row(absent)
  with pytest.raises(KeyError, match=text):
    table.test_accuracy_of(nb201.arch_to_string(absent))
  with pytest.raises(ValueError, match='not a NAS-Bench-201 cell'):
    table.row('|none~0|+|none~0|')
  with pytest.raises(ValueError, match='6 op indices'):
    table.row((0, 1, 5, 0, 0, 0))


def test_in_tells_the_cells_a_table_holds(tmp_path):
  table = table_of(tmp_path, entries())
  for arch in ARCHS:
    assert arch in table and list(arch) in table and nb201.arch_to_string(arch) in table
  assert (1, 1, 1, 1, 1, 1) not in table
  with pytest.raises(ValueError, match='6 op indices'):
    (0, 1, 5, 0, 0, 0) in table  # noqa: B015  # not a cell: an error, as for row()


def test_missing_validation_accuracy_is_nan(tmp_path):
  rows = entries()
  del rows[0][nasbench201.VALID_FIELD]
  rows[2][nasbench201.VALID_FIELD] = None
  table = table_of(tmp_path, rows)
  valid = table.valid_accuracy_12ep
  assert math.isnan(valid[0]) and math.isnan(valid[2])
  np.testing.assert_array_equal(valid[[1, 3, 4]], [VALID[1], VALID[3], VALID[4]])


def test_rank_counts_strictly_better_rows_and_ties_share_the_better_rank(tmp_path):
  table = table_of(tmp_path, entries(test=[90.0, 93.0, 93.0, 80.0, 94.0]))
  assert [table.rank(a) for a in ARCHS] == [4, 2, 2, 5, 1]
  assert table.best() == 4
  tied = table_of(tmp_path, entries(test=[93.0, 80.0, 93.0, 70.0, 60.0]))
  assert [tied.rank(a) for a in ARCHS] == [1, 3, 1, 4, 5]
  assert tied.best() == 0  # the first of the tied best rows


def test_sample_is_distinct_in_range_and_a_function_of_the_seed(tmp_path):
  archs = list(itertools.islice(itertools.product(range(5), repeat=6), 50))
  table = table_of(tmp_path, entries(archs, test=[50.0] * 50, valid=[40.0] * 50,
                                     indices=list(range(50))))
  rows = table.sample(10, seed=3)
  assert len(rows) == len(set(rows)) == 10
  assert all(isinstance(r, int) and 0 <= r < 50 for r in rows)
  assert table.sample(10, seed=3) == rows
  assert table.sample(10, seed=4) != rows
  expected = np.random.default_rng(3).choice(50, size=10, replace=False)
  assert rows == expected.tolist()  # the documented draw, stable across releases
  assert sorted(table.sample(50, seed=0)) == list(range(50))
  assert table.sample(0, seed=0) == []
  for count in (51, -1):
    with pytest.raises(ValueError, match=f'0 to 50 distinct rows.*not {count}'):
      table.sample(count, seed=0)


def test_summary_entry(tmp_path):
  table = table_of(tmp_path, entries())
  entry = table.summary_entry(nb201.arch_to_string(ARCHS[2]))
  assert entry == {
      'benchmark_string': nb201.arch_to_string(ARCHS[2]),
      'benchmark_index': 3,
      'benchmark_test_accuracy': 85.5,
      'benchmark_rank': 3,
      'benchmark_size': 5,
      'benchmark_best_test_accuracy': 94.37,
  }
  assert json.loads(json.dumps(entry)) == entry  # plain Python types for summary.json
  assert table.summary_entry(ARCHS[2]) == entry


def _bad(**changes):
  """The tiny table with entry 1 changed (a value of `...` deletes the field)."""
  rows = entries()
  for key, value in changes.items():
    if value is ...:
      del rows[1][key]
    else:
      rows[1][key] = value
  return {'architectures': rows}


ACC = nasbench201.TEST_FIELD
BAD_TABLES = {
    'not_json': ('{"architectures": [', r'is not JSON \(.*\); expected'),
    'binary': (None, 'is not JSON'),
    'top_level_list': ([], "has no 'architectures' list"),
    'no_architectures': ({'description': 'x'}, "has no 'architectures' list"),
    'architectures_not_a_list': ({'architectures': {'0': 1}}, "has no 'architectures' list"),
    'empty': ({'architectures': []}, 'has no architectures'),
    'entry_not_an_object': ({'architectures': [entries()[0], 'x']}, "entry 1 is 'x', not an"),
    'missing_arch': (_bad(arch=...), "entry 1 lacks 'arch'"),
    'missing_index': (_bad(index=...), "entry 1 lacks 'index'"),
    'missing_test_accuracy': (_bad(**{ACC: ...}), f"entry 1 lacks '{ACC}'"),
    'string_accuracy': (_bad(**{ACC: '93.1'}), f"entry 1 has a non-numeric '{ACC}' \\('93.1'\\)"),
    'bool_accuracy': (_bad(**{ACC: True}), f"entry 1 has a non-numeric '{ACC}'"),
    'string_valid_accuracy': (_bad(**{nasbench201.VALID_FIELD: 'n/a'}),
                              f"entry 1 has a non-numeric '{nasbench201.VALID_FIELD}'"),
    'accuracy_above_100': (_bad(**{ACC: 100.5}),
                           f"entry 1 has '{ACC}' 100.5, outside \\[0, 100\\]"),
    'negative_accuracy': (_bad(**{ACC: -1}), r'entry 1 .* -1, outside \[0, 100\]'),
    'nan_accuracy': ('{"architectures": [{"index": 0, "arch": "%s", "%s": NaN}]}'
                     % (nb201.arch_to_string(ARCHS[0]), ACC),
                     r'entry 0 .* nan, outside \[0, 100\]'),
    'valid_above_100': (_bad(**{nasbench201.VALID_FIELD: 101}), r'101, outside \[0, 100\]'),
    'malformed_arch': (_bad(arch='|conv~0|+|none~0|none~1|+|none~0|none~1|none~2|'),
                       r"entry 1: '\|conv~0\|.*' is not a NAS-Bench-201 cell: edge 'conv~0'"),
    'arch_not_a_string': (_bad(arch=[0, 0, 0, 0, 0, 0]), "entry 1 has 'arch' \\[0, 0"),
    'duplicate_arch': (_bad(arch=nb201.arch_to_string(ARCHS[0])),
                       'entries 0 and 1 are both .*; each architecture must appear once'),
    'duplicate_index': (_bad(index=INDICES[0]), 'entries 0 and 1 both have index 6111'),
    'index_out_of_range': (_bad(index=15625), r"entry 1 has 'index' 15625; .*\[0, 15625\)"),
    'index_not_an_int': (_bad(index='7'), "entry 1 has 'index' '7'"),
}


@pytest.mark.parametrize('case', sorted(BAD_TABLES))
def test_each_bad_table_is_one_value_error_naming_the_path(tmp_path, case):
  data, message = BAD_TABLES[case]
  if data is None:
    path = tmp_path / 'table.json'
    path.write_bytes(b'\x80\xff\x00 binary')
    path = str(path)
  else:
    path = write(tmp_path, data)
  with pytest.raises(ValueError, match=f'^NAS-Bench-201 table {re.escape(path)}.*{message}') as e:
    nasbench201.load(path)
  error = e.value  # One error, not a chain of tracebacks.
  assert error.__cause__ is None and (error.__suppress_context__ or error.__context__ is None)


def test_a_missing_file_is_named(tmp_path):
  path = tmp_path / 'nowhere.json'
  with pytest.raises(ValueError, match=f'^NAS-Bench-201 table {re.escape(str(path))} does not '
                                       r'exist\.$'):
    nasbench201.load(path)
  with pytest.raises(ValueError, match='does not exist as a file'):
    nasbench201.load(tmp_path)


def test_the_real_table(nb201_table_path):
  start = time.perf_counter()
  table = nasbench201.load(nb201_table_path)
  seconds = time.perf_counter() - start
  assert len(table) == nb201.NUM_ARCHITECTURES == 15625
  assert set(table.archs) == set(itertools.product(range(len(nb201.OPS)), repeat=nb201.NUM_EDGES))
  np.testing.assert_array_equal(table.indices, np.arange(15625))  # the API's index order
  best = table.best()
  assert nb201.arch_to_string(table.archs[best]) == (
      '|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|'
      'nor_conv_1x1~2|')
  assert table.test_accuracy[best] == pytest.approx(94.3733)
  assert table.rank(table.archs[best]) == 1
  assert not np.isnan(table.valid_accuracy_12ep).any()
  assert seconds < 1.0, f'loading took {seconds:.2f} s'
