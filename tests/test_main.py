"""The command line as users run it: python -m dfnas_jax.main --config=configs/<stage>.py."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(args, cwd):
  # As installed: no PYTHONPATH, and not run from the checkout (the configs import as
  # dfnas_jax.configs).
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  return subprocess.run([sys.executable, '-m', 'dfnas_jax.main', *args], cwd=cwd,
                        capture_output=True, text=True, timeout=600, env=env)


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


@pytest.mark.parametrize('args, message', [
    (['--config.learning_rat=0.1'], 'learning_rat'),
    (['--config.stage=dance'], "Unknown stage 'dance'"),
    ([], None),
])
def test_bad_command_lines_fail_loudly(tmp_path, args, message):
  config = f'{REPO}/configs/teacher.py:{"smoke" if args else "huge"}'
  out = _main([f'--config={config}', f'--workdir={tmp_path}', '--config.dataset=nope',
               *args], cwd=tmp_path)
  assert out.returncode != 0
  assert (message or "Unknown preset 'huge'") in out.stderr


@pytest.mark.parametrize('config, args, message', [
    ('teacher.py:smoke', ['--config.dataset=/no/such/dir'],
     'Error: Dataset directory /no/such/dir does not exist'),
    ('synthesize.py:smoke', ['--config.batch_size=-4'],
     'Error: batch_size and images_per_round must be positive, got -4 and 16.'),
])
def test_a_bad_input_is_one_line_without_a_traceback(tmp_path, config, args, message):
  out = _main([f'--config={REPO}/configs/{config}', f'--workdir={tmp_path}', *args], cwd=tmp_path)
  assert out.returncode == 1 and message in out.stderr, out.stderr[-2000:]
  assert 'Traceback' not in out.stderr
  if config.startswith('teacher'):  # once: --traceback shows where
    out = _main([f'--config={REPO}/configs/{config}', f'--workdir={tmp_path}', '--traceback',
                 *args], cwd=tmp_path)
    assert out.returncode == 1 and 'Traceback' in out.stderr
