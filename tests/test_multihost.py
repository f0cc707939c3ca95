"""Two JAX processes on 127.0.0.1 (CPU collectives over gloo), as on two hosts.

tests/multihost_worker.py is one process: it synthesizes the smoke dataset with
the other process (each makes the batches it owns) and trains the smoke
supernet with it for a few pmap-ed steps. The first run loses process 1 to
SIGKILL mid-training; the rerun resumes both from the last checkpoint.
"""
import hashlib
import os
import pathlib
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

pytestmark = pytest.mark.slow  # several processes, a kill and a resume

WORKER = pathlib.Path(__file__).with_name('multihost_worker.py')


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(workdir, crash_at_step=0):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one device per process
  env.update(JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  port = _free_port()
  procs = []
  for pid in (0, 1):
    log = open(workdir / f'run{crash_at_step}_process{pid}.log', 'w')
    procs.append(subprocess.Popen(
        [sys.executable, str(WORKER), str(pid), str(port), str(workdir), str(crash_at_step)],
        stdout=log, stderr=subprocess.STDOUT, env=env))
  return procs


def _log(workdir, run, pid):
  return (workdir / f'run{run}_process{pid}.log').read_text()


def test_two_processes_synthesize_train_identically_and_resume_after_a_kill(tmp_path):
  # Run 1: process 1 dies by SIGKILL at its fifth supernet step (checkpoints every 2 steps,
  # saved asynchronously); process 0 then waits on a collective that cannot complete, so it
  # is killed as well.
  first = _start(tmp_path, crash_at_step=5)
  try:
    assert first[1].wait(timeout=600) == -signal.SIGKILL, _log(tmp_path, 5, 1)[-3000:]
  finally:
    first[0].kill()
    first[0].wait()
  assert not (tmp_path / 'params_0.npz').exists()
  checkpoints = tmp_path / 'supernet' / 'checkpoints'
  saved = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  assert saved in (2, 4)  # 4 only if its save was finished when process 1 died

  # The dataset both processes wrote: complete, no duplicate or missing records.
  builder = tfds.builder_from_directory(str(tmp_path / 'synthesize' / 'synthetic'))
  records = list(tfds.as_numpy(builder.as_dataset(split='train', shuffle_files=False)))
  assert len(records) == 32 == builder.info.splits['train'].num_examples
  assert sorted(int(r['round']) for r in records) == [0] * 16 + [1] * 16
  assert len({hashlib.sha1(r['image'].tobytes()).hexdigest() for r in records}) == 32
  for pid in (0, 1):  # each synthesized its own two of the four batches
    assert _log(tmp_path, 5, pid).count('Synthesized round') == 2

  # Run 2: both resume from the last complete checkpoint and finish with identical parameters.
  second = _start(tmp_path)
  for pid, proc in enumerate(second):
    assert proc.wait(timeout=600) == 0, _log(tmp_path, 0, pid)[-3000:]
  for pid in (0, 1):
    log = _log(tmp_path, 0, pid)
    assert f'Resuming from step {saved} of 6.' in log and 'Synthesized round' not in log
  params = [np.load(tmp_path / f'params_{pid}.npz') for pid in (0, 1)]
  assert params[0].files == params[1].files and len(params[0].files) > 10
  for name in params[0].files:
    np.testing.assert_array_equal(params[0][name], params[1][name], err_msg=name)
  assert max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == 6
