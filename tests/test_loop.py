"""dfnas_jax.train.loop: when the shared step loop logs, checkpoints and stops."""
import jax
import jax.numpy as jnp
import pytest
from clu import metrics

from dfnas_jax.train import loop

Loss = metrics.Collection.create(loss=metrics.Average.from_output('loss'))


def _replicated(loss):
  return jax.tree_util.tree_map(lambda x: x[None], Loss.single_from_model_output(
      loss=jnp.asarray(loss, jnp.float32)))


def _run(tmp_path, losses, start_step=0, **kwargs):
  calls = {'log': [], 'save': [], 'after': []}

  def step_fn(state, step):
    arch = _replicated(100.0 + step) if step % 2 == 0 else None  # not every step has one
    return state + 1, {'train_': _replicated(losses[step - 1]), 'arch_': arch}

  def on_log(step, state, scalars, at_boundary):
    scalars['extra'] = float(state)
    calls['log'].append((step, dict(scalars), at_boundary))

  state = loop.Loop(str(tmp_path), start_step, len(losses)).run(
      start_step, step_fn, name='test', log_every_steps=3, checkpoint_every_steps=4,
      save=lambda step, state, at_boundary: calls['save'].append((step, state, at_boundary)),
      on_log=on_log, after_step=lambda step, state: calls['after'].append(step), **kwargs)
  return state, calls


def test_logs_window_means_and_checkpoints_on_their_steps_and_at_boundaries(tmp_path):
  state, calls = _run(tmp_path, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],
                      boundary=lambda step: step == 5)
  assert state == 7 and calls['after'] == [1, 2, 3, 4, 5, 6, 7]
  assert calls['log'] == [
      (3, {'train_loss': 2.0, 'arch_loss': 102.0, 'extra': 3.0}, False),
      (5, {'train_loss': 4.5, 'arch_loss': 104.0, 'extra': 5.0}, True),   # the boundary
      (6, {'train_loss': 6.0, 'arch_loss': 106.0, 'extra': 6.0}, False),
      (7, {'train_loss': 7.0, 'extra': 7.0}, True)]                       # the last step
  assert calls['save'] == [(4, 4, False), (5, 5, True), (7, 7, True)]


def test_a_resumed_loop_runs_only_the_steps_left(tmp_path):
  state, calls = _run(tmp_path, [1.0] * 7, start_step=4)
  assert state == 7 and calls['after'] == [5, 6, 7]
  assert [s for s, _, _ in calls['log']] == [6, 7]


def test_a_diverged_metric_stops_the_run_naming_it(tmp_path):
  with pytest.raises(FloatingPointError, match=r'test diverged: train_loss = nan in the steps '
                                               r'up to 3\. Lower the learning rate'):
    _run(tmp_path, [1.0, float('nan'), 2.0, 1.0])
