"""What the one-shot supernet tests share: a training step that counts its compilations."""
import jax
import numpy as np

from dfnas_jax import models
from dfnas_jax.models import layers
from dfnas_jax.train import state as state_lib
from dfnas_jax.train import steps


def leaf(tree, *path):
  for key in path:
    tree = tree[key]
  return np.asarray(tree)


def counting_path_step(name: str, image_size: int, batch_size: int = 4):
  """(step(state, arch) -> state, replicated initial state, traces, batch) for supernet `name`.

  SGD with momentum and weight decay, so an update that reached an unused choice
  would show in its parameters and momentum; `traces` grows once per compilation.
  """
  model = models.build_model(name, 10)
  traces = []

  def apply_fn(*args, **kwargs):
    traces.append(1)  # runs once per trace, not per step
    return model.apply(*args, **kwargs)

  lr = state_lib.learning_rate_schedule(0.1, 10, 0, 'linear')
  tx = state_lib.sgd(lr, momentum=0.9, weight_decay=0.1, nesterov=False)
  state = state_lib.create_train_state(model, jax.random.PRNGKey(0), image_size, tx)
  state = steps.replicate(state.replace(apply_fn=apply_fn))
  p_step = steps.pmap_train_step(learning_rate_fn=lr, after_update=layers.keep_unused_choices)
  rng = np.random.default_rng(0)
  batch = {'image': rng.random((1, batch_size, image_size, image_size, 3), np.float32),
           'label': rng.integers(0, 10, (1, batch_size)).astype(np.int32)}

  def step(state, arch):
    return p_step(state, dict(batch, arch=np.asarray([arch], np.int32)))[0]

  return step, state, traces, batch
