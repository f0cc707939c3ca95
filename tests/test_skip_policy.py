"""tests/conftest.py's policies: a skipped test says why, and under DFNAS_TEST_NO_SKIPS=1
(.ci/run) a missing data copy stops the run up front and any skip fails it; a test that
reads real data is in the slow tier."""
import os
import pathlib

import pytest

CONFTEST = pathlib.Path(__file__).with_name('conftest.py')
SAMPLE = """
import pytest

def test_runs():
  pass

def test_needs_what_is_absent():
  pytest.skip('needs something absent')
"""


def _run(pytester, monkeypatch, tmp_path, *args, no_skips, with_data=True, sample=SAMPLE):
  pytester.makeconftest(CONFTEST.read_text())
  pytester.makepyfile(test_sample=sample)
  data_dir = tmp_path / 'tfds'
  if with_data:
    (data_dir / 'cifar10_jpeg').mkdir(parents=True)
  table = tmp_path / 'cifar10.json'
  table.write_text('{}')
  fake_torch = tmp_path / 'site' / 'torch'  # the check only looks for the package
  fake_torch.mkdir(parents=True)
  (fake_torch / '__init__.py').write_text('')
  monkeypatch.setenv('DFNAS_TEST_DATA_DIR', str(data_dir))
  monkeypatch.setenv('DFNAS_NB201_TABLE', str(table))
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
      [str(fake_torch.parent)] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
  if no_skips:
    monkeypatch.setenv('DFNAS_TEST_NO_SKIPS', '1')
  else:
    monkeypatch.delenv('DFNAS_TEST_NO_SKIPS', raising=False)
  return pytester.runpytest_subprocess('-rs', '-p', 'no:cacheprovider', *args)


def test_a_skip_says_why_and_passes_by_default(pytester, monkeypatch, tmp_path):
  result = _run(pytester, monkeypatch, tmp_path, no_skips=False)
  assert result.ret == pytest.ExitCode.OK
  result.assert_outcomes(passed=1, skipped=1)
  result.stdout.fnmatch_lines(['*SKIPPED*needs something absent*'])


def test_no_skips_fails_a_run_with_a_skip_on_two_workers(pytester, monkeypatch, tmp_path):
  result = _run(pytester, monkeypatch, tmp_path, '-n', '2', no_skips=True)
  assert result.ret == pytest.ExitCode.TESTS_FAILED
  result.assert_outcomes(passed=1, skipped=1)
  result.stdout.fnmatch_lines(['*DFNAS_TEST_NO_SKIPS=1: 1 test(s) skipped*'])


def test_no_skips_stops_before_any_test_when_the_data_is_missing(pytester, monkeypatch, tmp_path):
  result = _run(pytester, monkeypatch, tmp_path, no_skips=True, with_data=False)
  assert result.ret == pytest.ExitCode.USAGE_ERROR
  result.stderr.fnmatch_lines(['*DFNAS_TEST_NO_SKIPS=1*offline cifar10_jpeg not found under*tfds*'])
  assert 'passed' not in result.stdout.str()


TIERS = """
import pytest

def test_fast():
  pass

def test_reads_real_data(data_dir):
  pass

def test_through_a_fixture_that_reads_real_data(nb201_table_path):
  pass

@pytest.mark.slow
def test_marked_slow():
  pass
"""


@pytest.mark.parametrize('marks, outcomes', [
    ('not slow', dict(passed=1, deselected=3)),
    ('slow', dict(passed=3, deselected=1)),
    ('slow or not slow', dict(passed=4)),
])
def test_real_data_tests_are_in_the_slow_tier(pytester, monkeypatch, tmp_path, marks,
                                              outcomes):
  result = _run(pytester, monkeypatch, tmp_path, '-m', marks, no_skips=False, sample=TIERS)
  result.assert_outcomes(**outcomes)
