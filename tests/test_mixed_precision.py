"""compute_dtype='bfloat16': activations in bfloat16, parameters, optimizer state and
losses in float32; on a tiny problem the losses stay finite and near float32's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfnas_jax import models, teachers
from dfnas_jax.synthesis import inversion
from dfnas_jax.train import state as state_lib
from dfnas_jax.train import steps


def test_compute_dtype_names():
  assert models.compute_dtype('bfloat16') == jnp.bfloat16
  with pytest.raises(ValueError, match=r"compute_dtype='fp16': expected one of \['bfloat16', "
                                       r"'float32'\]"):
    models.compute_dtype('fp16')


def test_bfloat16_inversion_tracks_float32(quick_compiles):
  settings = inversion.Settings(canvas=36, window=32, warmup_steps=2, lr=0.1)
  targets = np.eye(10, dtype=np.float32)[np.arange(8)][None]
  keys = inversion.image_keys(0, 0, np.arange(8))[None]
  histories, logits = {}, {}
  for dtype in (jnp.float32, jnp.bfloat16):
    module, variables, _ = teachers.load('cifar10_resnet20', dtype=dtype)
    inverter = inversion.Inverter(module.apply, variables, module.mean, module.std, settings,
                                  stages=[(1, 30)], chunk_steps=5)
    histories[dtype] = []
    _, logits[dtype] = inverter.synthesize(targets, keys,
                                           lambda _, terms: histories[dtype].append(terms))
  for f32, bf16 in zip(histories[jnp.float32], histories[jnp.bfloat16]):
    assert all(np.isfinite(v) for v in bf16.values()), bf16
    # The BN-statistics term (the largest) within 5%; pixel-space terms see no bf16 at all.
    assert abs(bf16['bn'] - f32['bn']) < 0.05 * f32['bn'], (f32, bf16)
    assert abs(bf16['main'] - f32['main']) < 0.1 * f32['main'] + 0.02, (f32, bf16)
  assert histories[jnp.float32][-1]['main'] < 0.5 * histories[jnp.float32][0]['main']
  assert histories[jnp.float32][-1]['bn'] != histories[jnp.bfloat16][-1]['bn']  # bf16 is on
  # The synthesized images are classified the same way.
  np.testing.assert_array_equal(logits[jnp.float32].argmax(-1), logits[jnp.bfloat16].argmax(-1))


def test_bfloat16_supernet_steps_track_float32(quick_compiles):
  rng = np.random.default_rng(0)
  batch = {'image': rng.random((1, 8, 32, 32, 3), np.float32),
           'label': rng.integers(0, 10, (1, 8)).astype(np.int32),
           'arch': np.asarray([[1, 3, 0, 2]], np.int32)}
  lr = state_lib.learning_rate_schedule(0.05, 10, 0, 'linear')
  losses = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    model = models.build_model('spos_tiny', 10, dtype)
    tx = state_lib.sgd(lr, momentum=0.9, weight_decay=4e-5, nesterov=False)
    state = steps.replicate(state_lib.create_train_state(model, jax.random.PRNGKey(0), 32, tx))
    p_step = steps.pmap_train_step(learning_rate_fn=lr)
    losses[dtype] = []
    for _ in range(6):
      state, m = p_step(state, batch)
      losses[dtype].append(float(jax.device_get(m.loss.total / m.loss.count)[0]))
    kept = jax.device_get(state)
    dtypes = {x.dtype for x in jax.tree_util.tree_leaves((kept.params, kept.batch_stats,
                                                          kept.opt_state))
              if jnp.issubdtype(x.dtype, jnp.floating)}
    assert dtypes == {np.dtype(np.float32)}, dtypes
  f32, bf16 = np.array(losses[jnp.float32]), np.array(losses[jnp.bfloat16])
  assert np.all(np.isfinite(bf16)) and not np.array_equal(bf16, f32)  # bf16 is on
  # Step 1 compares the forward pass from identical parameters; later steps also carry the
  # slightly different bf16 gradients along the trajectory (measured: at most 0.026 apart).
  np.testing.assert_allclose(bf16[0], f32[0], rtol=1e-2)
  np.testing.assert_allclose(bf16, f32, atol=0.05)
  assert f32[-1] < f32[0]  # it trains (the same batch six times)
