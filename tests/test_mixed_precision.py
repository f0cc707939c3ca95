"""compute_dtype='bfloat16': activations in bfloat16, parameters, optimizer state and
losses in float32; on a tiny problem bf16 tracks float32 where it must (a first step
from identical inputs) and otherwise does its job on its own terms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfnas_jax import models, teachers
from dfnas_jax.models import layers
from dfnas_jax.synthesis import inversion
from dfnas_jax.train import state as state_lib
from dfnas_jax.train import steps
from tests import inversion_settings

# bfloat16 keeps 8 significant bits: one rounding is off by at most u = 2**-8 relative.
BF16_ROUNDING = 2.0 ** -8


def bf16_rtol(roundings):
  """Relative tolerance of a float32 loss from a bf16 forward pass `roundings` roundings
  deep, against the float32 pass on identical inputs and weights.

  Round-to-nearest errors (each at most u) are independent and of either sign, so along
  a path they add up like a random walk, sqrt(n) * u rather than n * u, and a loss
  averages them over thousands of activations besides. Hardware that orders its
  arithmetic differently flips single roundings but does not make them larger. Later
  steps are no test: optimization turns one step's rounding into another trajectory.
  """
  return np.sqrt(roundings) * BF16_ROUNDING


def test_compute_dtype_names():
  assert models.compute_dtype('bfloat16') == jnp.bfloat16
  with pytest.raises(ValueError, match=r"compute_dtype='fp16': expected one of \['bfloat16', "
                                       r"'float32'\]"):
    models.compute_dtype('fp16')


def test_bfloat16_inversion_tracks_float32(quick_compiles):
  settings = inversion_settings.settings(canvas=36, window=32, warmup_steps=2, lr=0.1)
  targets = np.eye(10, dtype=np.float32)[np.arange(8)][None]
  keys = inversion.image_keys(0, 0, np.arange(8))[None]
  histories, logits = {}, {}
  for dtype in (jnp.float32, jnp.bfloat16):
    module, variables, _ = teachers.load('cifar10_resnet20', dtype=dtype)
    # One step per chunk: the terms of every step, the first on the shared initial canvases.
    inverter = inversion.Inverter(module.apply, variables, module.mean, module.std, settings,
                                  stages=[(1, 30)], chunk_steps=1)
    histories[dtype] = []
    _, logits[dtype] = inverter.synthesize(targets, keys,
                                           lambda _, terms: histories[dtype].append(terms))
  f32, bf16 = histories[jnp.float32], histories[jnp.bfloat16]
  assert len(bf16) == 30 and all(np.isfinite(v) for t in bf16 for v in t.values()), bf16
  # First step, same canvases: the teacher's terms differ by bf16 rounding only. Deepest
  # path of ResNet-20: input cast, conv + BN (2) in the stem, conv1 + bn1 + conv2 + bn2 +
  # residual add (5) in each of 9 blocks, pooling and the classifier: 50 roundings.
  rtol = bf16_rtol(50)  # 2.8%; measured at most 1u = 0.4% (main), 0.2u (bn)
  for k in ('main', 'bn'):
    assert abs(bf16[0][k] - f32[0][k]) < rtol * f32[0][k], (k, f32[0], bf16[0])
  assert (bf16[0]['main'], bf16[0]['bn']) != (f32[0]['main'], f32[0]['bn'])  # bf16 is on
  # Pixel-space terms see no bf16 at all: float32 rounding only.
  for k in ('tv_l2', 'tv_l1', 'l2'):
    np.testing.assert_allclose(bf16[0][k], f32[0][k], rtol=1e-5, err_msg=k)
  # Then bf16 optimizes on its own: cross-entropy and BN-statistics terms both fall
  # (measured: main by >1000x, bn to 0.65 of its start, with either dtype) ...
  assert bf16[-1]['main'] < 0.1 * bf16[0]['main'], (bf16[0], bf16[-1])
  assert bf16[-1]['bn'] < 0.8 * bf16[0]['bn'], (bf16[0], bf16[-1])
  # ... and the teacher classifies both dtypes' images as their targets: what bf16 must
  # achieve, whatever path its rounding takes there.
  for dtype in (jnp.float32, jnp.bfloat16):
    np.testing.assert_array_equal(logits[dtype].argmax(-1), targets.argmax(-1), err_msg=dtype)


@pytest.mark.slow  # bfloat16 convolutions are emulated on CPU
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
    p_step = steps.pmap_train_step(learning_rate_fn=lr, after_update=layers.keep_unused_choices)
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
  assert np.all(np.isfinite(bf16)) and not np.array_equal(bf16, f32), (f32, bf16)  # bf16 is on
  # Step 1 is the forward pass from identical parameters. Deepest path of this
  # architecture: input cast, stem conv + BN, 15 conv + BN pairs in the four choice
  # blocks (3 + 6 in the Xception one + 3 + 3), last conv + BN, pooling, dropout and
  # the classifier: 38 roundings.
  np.testing.assert_allclose(bf16[0], f32[0], rtol=bf16_rtol(38))  # measured 0.002u
  # Later steps follow bf16's own gradients: the same batch six times, so its loss
  # falls at every step (measured: by 0.15 or more, to 0.26 of the first; float32 alike).
  assert np.all(np.diff(bf16) < 0) and bf16[-1] < 0.5 * bf16[0], bf16
  assert f32[-1] < 0.5 * f32[0], f32
