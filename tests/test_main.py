"""The command line as users run it: python -m dfnas_jax.main --config=configs/<stage>.py."""
import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(args, cwd, **env):
  # As installed: no PYTHONPATH, and not run from the checkout (the configs import as
  # dfnas_jax.configs). `env`: variables to set (None: unset).
  env = {k: v for k, v in {**os.environ, 'PYTHONPATH': None, **env}.items() if v is not None}
  return subprocess.run([sys.executable, '-m', 'dfnas_jax.main', *args], cwd=cwd,
                        capture_output=True, text=True, timeout=600, env=env)


# Imported at interpreter start-up (from PYTHONPATH): no host name resolves but the local
# ones, as on a machine without network.
OFFLINE_SITECUSTOMIZE = """
import socket
_getaddrinfo = socket.getaddrinfo
def _offline(host, *args, **kwargs):
  if host not in (None, 'localhost', '127.0.0.1', '::1'):
    raise socket.gaierror(socket.EAI_NONAME, 'Name or service not known (offline test)')
  return _getaddrinfo(host, *args, **kwargs)
socket.getaddrinfo = _offline
"""
PROXIES = ('http_proxy', 'https_proxy', 'all_proxy', 'HTTP_PROXY', 'HTTPS_PROXY', 'ALL_PROXY')


def _error_line(stderr: str) -> str:
  """The `Error: ...` line a bad input ends in: the last but one (the last says how to see
  the traceback)."""
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert 'Traceback' not in stderr and lines[-1].endswith('--traceback shows where it was '
                                                          'raised)'), stderr[-3000:]
  return lines[-2]


def test_an_unreachable_download_fails_at_once_before_any_work(tmp_path):
  """The default evaluation data (CIFAR-10, downloaded) without network: one request, then
  one line naming the data and the flags that do without the download."""
  site = tmp_path / 'offline'
  site.mkdir()
  (site / 'sitecustomize.py').write_text(OFFLINE_SITECUSTOMIZE)
  start = time.time()
  # TFDS_DATA_DIR: an empty data directory, in case this machine has CIFAR-10 prepared.
  out = _main([f'--config={REPO}/configs/spos.py:smoke'], cwd=tmp_path, PYTHONPATH=str(site),
              TFDS_DATA_DIR=str(tmp_path / 'tfds'), **dict.fromkeys(PROXIES))
  seconds = time.time() - start
  assert out.returncode == 1
  line = _error_line(out.stderr)
  assert line.startswith("Error: Dataset 'cifar10' (split 'test[:64]') is not prepared under "
                         'data_dir=None and its download failed: cannot reach https://'), line
  assert ('Point the stage at a prepared copy with --config.eval_dataset=NAME '
          "--config.eval_data_dir=DIR --config.download=False, or do without it: "
          "--config.eval_dataset=''") in line
  assert not (tmp_path / 'workdir').exists()  # nothing synthesized or trained
  # Imports and one failed request: 5-10 s idle, up to 35 s on a loaded 2-core machine;
  # TFDS's retries take minutes.
  assert seconds < 60, seconds


@pytest.mark.parametrize('args, message', [
    ([':nope'], "Error: Unknown preset 'nope' for spos; presets: ('', 'smoke', 'imagenet', "
                "'nb201', 'nb201_smoke')"),
    ([':smoke', '--config.synthesis.batch_szie=4'],
     "Error: --config.synthesis.batch_szie: synthesis has no field 'batch_szie'; did you mean "
     "'batch_size'?"),
])
def test_a_bad_config_is_one_line_without_a_traceback(tmp_path, args, message):
  preset, *overrides = args
  command = [f'--config={REPO}/configs/spos.py{preset}', *overrides]
  start = time.time()
  out = _main(command, cwd=tmp_path)
  seconds = time.time() - start
  assert out.returncode == 1 and _error_line(out.stderr) == message
  assert seconds < 60, seconds  # the imports (as above); the flags fail before main()
  if preset == ':nope':  # once: --traceback shows where
    out = _main([*command, '--traceback'], cwd=tmp_path)
    assert out.returncode == 1 and 'Traceback' in out.stderr and message[7:] in out.stderr


def test_teacher_then_evaluate(data_dir, tmp_path):
  out = _main([f'--config={REPO}/configs/teacher.py:smoke', '--config.architecture=cifar_resnet8',
               '--config.dataset=cifar10_jpeg', f'--config.data_dir={data_dir}',
               '--config.download=False', '--config.image_size=16'], cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  workdir = tmp_path / 'workdir' / 'teacher'  # the default: ./workdir/<config stem>
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['num_train_steps'] == 8 and 0.0 <= summary['eval_accuracy'] <= 1.0
  assert (workdir / 'model' / 'model.json').exists()

  out = _main([f'--config={REPO}/configs/evaluate.py', f'--config.model={workdir}/model',
               '--config.dataset=cifar10_jpeg', f'--config.data_dir={data_dir}',
               "--config.split=train[256:384]", f'--workdir={tmp_path}/eval'], cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  evaluation = json.loads((tmp_path / 'eval' / 'summary.json').read_text())
  assert evaluation['num_examples'] == 128
  # The exported model reproduces the accuracy the training run measured on the same split.
  assert evaluation['accuracy'] == pytest.approx(summary['eval_accuracy'], abs=1e-6)


@pytest.mark.parametrize('config, args, message', [
    ('teacher.py:smoke', ['--config.dataset=/no/such/dir'],
     'Error: Dataset directory /no/such/dir does not exist'),
    ('synthesize.py:smoke', ['--config.batch_size=-4'],
     'Error: batch_size and images_per_round must be positive, got -4 and 16.'),
    ('retrain.py:smoke', ['--config.stage=dance'], "Error: Unknown stage 'dance'; known stages:"),
])
def test_a_bad_input_is_one_line_without_a_traceback(tmp_path, config, args, message):
  out = _main([f'--config={REPO}/configs/{config}', f'--workdir={tmp_path}', *args], cwd=tmp_path)
  assert out.returncode == 1 and message in out.stderr, out.stderr[-2000:]
  assert 'Traceback' not in out.stderr
  if config.startswith('teacher'):  # once: --traceback shows where
    out = _main([f'--config={REPO}/configs/{config}', f'--workdir={tmp_path}', '--traceback',
                 *args], cwd=tmp_path)
    assert out.returncode == 1 and 'Traceback' in out.stderr
