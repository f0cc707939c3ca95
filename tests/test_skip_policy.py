"""tests/conftest.py's skip policy: a skipped test says why, and under DFNAS_TEST_NO_SKIPS=1
(.ci/run) a missing data copy stops the run up front and any skip fails it."""
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


def _run(pytester, monkeypatch, tmp_path, *args, no_skips, with_data=True):
  pytester.makeconftest(CONFTEST.read_text())
  pytester.makepyfile(test_sample=SAMPLE)
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
