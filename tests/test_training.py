import os
import subprocess
import sys
import textwrap

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dfnas_jax import models, teachers
from dfnas_jax import workdir as wd
from dfnas_jax.data import input_pipeline as ip
from dfnas_jax.train import state as state_lib
from dfnas_jax.train import steps, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Preempted(Exception):
  pass


def _sources(config):
  return (ip.get_source(config.dataset, config.train_split, config.data_dir, False), None)


def test_schedule_warms_up_then_decays_to_zero():
  lr = state_lib.learning_rate_schedule(0.4, 100, 10)
  assert float(lr(0)) == 0.0
  assert float(lr(10)) == pytest.approx(0.4)
  assert float(lr(55)) == pytest.approx(0.2, rel=1e-3)
  assert float(lr(100)) == pytest.approx(0.0, abs=1e-7)


def test_weight_decay_only_on_kernels():
  params = {'conv': {'kernel': jnp.ones((3, 3, 2, 2))}, 'bn': {'scale': jnp.ones(2)}}
  tx = state_lib.sgd(lambda _: 0.1, momentum=0.0, weight_decay=0.5, nesterov=False)
  zero = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  assert float(updates['conv']['kernel'][0, 0, 0, 0]) == pytest.approx(-0.05)
  assert float(updates['bn']['scale'][0]) == 0.0


def test_train_step_fits_a_batch(data_dir):
  source = ip.get_source('cifar10_jpeg', 'train[:32]', data_dir, download=False)
  batch = next(ip.train_batches(source, 32, 16, 'none', seed=0))
  model = models.build_model('cifar_resnet8', 10)
  lr = state_lib.learning_rate_schedule(0.05, 1000, 1)
  state = flax.jax_utils.replicate(state_lib.create_train_state(
      model, jax.random.PRNGKey(0), 16, state_lib.sgd(lr, 0.9, 0.0)))
  p_step = steps.pmap_train_step(learning_rate_fn=lr)
  losses = []
  for _ in range(25):
    state, m = p_step(state, batch)
    losses.append(float(flax.jax_utils.unreplicate(m).compute()['loss']))
  assert losses[-1] < 0.3 * losses[0], losses


def test_resume_after_crash_equals_uninterrupted_run(train_config, tmp_path, monkeypatch):
  config = train_config
  config.num_train_steps = 8
  config.checkpoint_every_steps = 1
  train_source, _ = _sources(config)
  model = models.build_model(config.architecture, 10)
  full = trainer.fit(config, str(tmp_path / 'full'), model, train_source, None)

  real_batches = ip.train_batches
  start_steps = []

  def crashing_batches(*args, **kwargs):
    start_steps.append(kwargs['start_step'])
    for i, batch in enumerate(real_batches(*args, **kwargs)):
      if i == 6:
        raise Preempted()
      yield batch

  monkeypatch.setattr(ip, 'train_batches', crashing_batches)
  with pytest.raises(Preempted):
    trainer.fit(config, str(tmp_path / 'crash'), model, train_source, None)

  monkeypatch.setattr(ip, 'train_batches', lambda *a, **k: (start_steps.append(k['start_step']),
                                                              real_batches(*a, **k))[1])
  resumed = trainer.fit(config, str(tmp_path / 'crash'), model, train_source, None)
  assert start_steps[0] == 0 and 0 < start_steps[1] < 8  # Continued from a saved step.
  assert int(resumed['state'].step) == int(full['state'].step) == 8
  jax.tree_util.tree_map(np.testing.assert_array_equal, resumed['state'].params,
                         full['state'].params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, resumed['state'].batch_stats,
                         full['state'].batch_stats)


def test_stopwatch_counts_the_kept_work_of_every_attempt(tmp_path, monkeypatch):
  clock = [100.0]
  monkeypatch.setattr(wd.time, 'time', lambda: clock[0])
  first = wd.Stopwatch(str(tmp_path))
  clock[0] += 5
  first.mark(2)
  clock[0] += 7
  first.mark(4)
  clock[0] += 30  # killed: this work is lost, and its time is not counted
  resumed = wd.Stopwatch(str(tmp_path), resumed_step=3)  # restored step 3: marked at 2
  clock[0] += 1
  assert resumed.seconds() == 6
  resumed.mark(6)
  assert wd.read_json(str(tmp_path / 'wall_time.json')) == {'2': 5, '6': 6}
  assert wd.Stopwatch(str(tmp_path), resumed_step=6).seconds() == 6
  assert wd.Stopwatch(str(tmp_path)).seconds() == 0  # a fresh start ignores old marks


def test_checkpoint_of_another_model_is_a_clear_error(train_config, tmp_path):
  config = train_config
  config.num_train_steps = 3
  train_source, _ = _sources(config)
  trainer.fit(config, str(tmp_path), models.build_model('cifar_resnet8', 10), train_source, None)
  with pytest.raises(ValueError, match='does not match this run'):
    trainer.fit(config, str(tmp_path), models.build_model('cifar_resnet20', 10), train_source, None)


def test_teacher_stage_fine_tunes_from_init_from(train_config, tmp_path):
  from dfnas_jax.train import teacher as teacher_train
  config = train_config
  config.num_train_steps, config.eval_split = 3, ''
  first = teacher_train.run(config, str(tmp_path / 'first'))
  # With a zero learning rate, fine-tuning must return exactly the initial parameters
  # (a random initialization would not).
  config.init_from, config.learning_rate = first['model_dir'], 0.0
  tuned = teacher_train.run(config, str(tmp_path / 'tuned'))
  _, start, _ = teachers.load(first['model_dir'])
  _, end, _ = teachers.load(tuned['model_dir'])
  jax.tree_util.tree_map(np.testing.assert_array_equal, end['params'], start['params'])
  config.architecture = 'cifar_resnet20'
  with pytest.raises(ValueError, match=r'init_from .* do not match the model'):
    teacher_train.run(config, str(tmp_path / 'wrong'))


def test_teacher_stage_averages_weights_and_recomputes_batchnorm(train_config, tmp_path):
  from dfnas_jax.train import teacher as teacher_train
  config = train_config
  config.num_train_steps, config.eval_split = 3, ''
  first = teacher_train.run(config, str(tmp_path / 'first'))
  config.average_with = 'no_such_teacher'
  with pytest.raises(ValueError, match='Unknown teacher'):  # before any training
    teacher_train.run(config, str(tmp_path / 'bad'))
  assert not (tmp_path / 'bad' / 'checkpoints').exists()

  # A zero learning rate keeps the second run at its seed-1 initialization.
  config.seed, config.learning_rate = 1, 0.0
  config.average_with, config.average_batch_size = first['model_dir'], 64
  summary = teacher_train.run(config, str(tmp_path / 'averaged'))
  assert summary['averaged_with'] == [first['model_dir']]
  module, averaged, _ = teachers.load(summary['model_dir'])
  _, other, _ = teachers.load(first['model_dir'])
  trained = state_lib.init_variables(module, jax.random.PRNGKey(1), config.image_size)
  jax.tree_util.tree_map(lambda a, b, c: np.testing.assert_allclose(a, (b + c) / 2, atol=1e-7),
                         averaged['params'], trained['params'], other['params'])
  # The first BatchNorm's mean is the mean of conv1's output over one augmented pass.
  source = ip.get_source(config.dataset, config.train_split, config.data_dir, False)
  num_batches = ip.steps_per_epoch(source, 64)
  assert num_batches == 4
  batches = ip.train_batches(source, 64, config.image_size, config.augment, config.seed + 1)
  conv1_means = []
  for _, batch in zip(range(num_batches), batches):
    _, inter = module.apply(averaged, batch['image'][0], capture_intermediates=True)
    conv1_means.append(np.mean(inter['intermediates']['conv1']['__call__'][0], axis=(0, 1, 2)))
  np.testing.assert_allclose(averaged['batch_stats']['bn1']['mean'], np.mean(conv1_means, 0),
                             atol=1e-5)
  assert not np.allclose(averaged['batch_stats']['bn1']['mean'],
                         other['batch_stats']['bn1']['mean'])


@pytest.mark.slow  # a second process with two devices
def test_two_devices_match_one_device():
  """pmean-ed gradients and cross-replica BatchNorm: 2 devices x 8 == 1 device x 16."""
  script = textwrap.dedent('''
      import functools, jax, numpy as np, flax.jax_utils
      from dfnas_jax import models, teachers
      from dfnas_jax.train import state as state_lib, steps
      assert jax.local_device_count() == 2
      model = models.build_model('cifar_resnet8', 10)
      lr = lambda step: 0.1
      state = state_lib.create_train_state(model, jax.random.PRNGKey(0), 8,
                                           state_lib.sgd(lr, 0.9, 5e-4))
      rng = np.random.default_rng(0)
      batch = {'image': rng.random((16, 8, 8, 3), dtype=np.float32),
               'label': rng.integers(0, 10, 16).astype(np.int32)}
      step = functools.partial(steps.train_step, learning_rate_fn=lr)
      results = []
      for n in (1, 2):
        p_step = jax.pmap(step, axis_name='batch', devices=jax.local_devices()[:n])
        sharded = {k: v.reshape((n, 16 // n) + v.shape[1:]) for k, v in batch.items()}
        rstate = flax.jax_utils.replicate(state, jax.local_devices()[:n])
        for _ in range(2):
          rstate, m = p_step(rstate, sharded)
        results.append(jax.tree_util.tree_map(lambda x: np.asarray(x)[0], rstate))
      for a, b in zip(jax.tree_util.tree_leaves(results[0]), jax.tree_util.tree_leaves(results[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
      print('OK')
  ''')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and 'OK' in out.stdout, out.stderr[-3000:]


def test_sgd_clips_the_global_gradient_norm_before_the_step():
  params = {'conv': {'kernel': jnp.ones((3, 3))}, 'bn': {'bias': jnp.ones((3,))}}
  grads = jax.tree_util.tree_map(lambda p: 10.0 * p, params)  # norm 10 * sqrt(12)
  for clip, norm in ((0.0, 10 * np.sqrt(12)), (2.0, 2.0)):
    tx = state_lib.sgd(lambda step: 0.5, momentum=0.9, weight_decay=0.0, nesterov=False,
                       grad_clip=clip)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(optax.tree.norm(updates)) == pytest.approx(0.5 * norm, rel=1e-5)
