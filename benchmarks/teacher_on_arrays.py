"""Train a zoo teacher from in-memory arrays, augmenting on the accelerator.

For an accelerator machine without TensorFlow (so without the TFDS reader): the
CIFAR-10 JPEGs travel as one `.npz`, are decoded with Pillow and kept on the
device, and each step gathers, pad-crops and flips its batch there. (The shipped
`cifar10_resnet20` was trained on CPU by the teacher stage; see its model card.) Model,
optimizer and train step are the package's own (`dfnas_jax.train`), so the recipe matches
`configs/teacher.py`. It also reports
training throughput (steps/s, images/s).

  # here, once: export the JPEG bytes of a TFDS split
  python benchmarks/teacher_on_arrays.py --export=/tmp/cifar10.npz \
      --export_dataset=cifar10_jpeg --export_data_dir=../shared/data/tfds
  # there: train for at most --budget_s seconds of steps, then evaluate
  python benchmarks/teacher_on_arrays.py --data=/tmp/cifar10.npz --out=/tmp/teacher

The number of epochs is the largest that fits `--budget_s` at the speed of a
timed probe (capped by --max_epochs), so the cosine schedule always completes.
"""
import io
import json
import os
import time

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dfnas_jax import teachers
from dfnas_jax.train import state as state_lib
from dfnas_jax.train import steps as steps_lib

flags.DEFINE_string('export', None, 'Write the .npz of JPEG bytes here and exit.')
flags.DEFINE_string('export_dataset', 'cifar10_jpeg', 'TFDS dataset to export.')
flags.DEFINE_string('export_data_dir', None, 'TFDS data_dir to export from.')
flags.DEFINE_string('data', None, '.npz written by --export.')
flags.DEFINE_string('out', None, 'Directory for model.json + variables.msgpack + result.json.')
flags.DEFINE_integer('num_train', 45000, 'The first N images train.')
flags.DEFINE_integer('num_eval', 5000, 'The next N images evaluate.')
flags.DEFINE_string('name', 'cifar10_resnet20', 'Zoo teacher whose spec is exported.')
flags.DEFINE_integer('batch_size', 128, 'Global batch size.')
flags.DEFINE_float('learning_rate', 0.1, 'Peak learning rate.')
flags.DEFINE_float('weight_decay', 5e-4, 'Weight decay on kernels.')
flags.DEFINE_float('warmup_epochs', 2.0, 'Linear warm-up epochs.')
flags.DEFINE_integer('max_epochs', 200, 'Upper bound on epochs.')
flags.DEFINE_float('budget_s', 300.0, 'Seconds of training steps to plan for.')
flags.DEFINE_integer('seed', 0, 'Initialization and data-order seed.')
FLAGS = flags.FLAGS


def export(path, dataset, data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # One file at a time, so record i is `train[i]` and --num_train=45000 holds out
  # exactly `train[45000:]` (the default interleaving mixes the shards' records).
  ds = tfds.load(dataset, split='train', data_dir=data_dir, shuffle_files=False,
                 decoders={'image': tfds.decode.SkipDecoding()},
                 read_config=tfds.ReadConfig(interleave_cycle_length=1))
  jpegs, labels = [], []
  for example in tfds.as_numpy(ds):
    jpegs.append(example['image'])
    labels.append(example['label'])
  offsets = np.cumsum([0] + [len(j) for j in jpegs]).astype(np.int64)
  np.savez(path, jpeg=np.frombuffer(b''.join(jpegs), np.uint8), offsets=offsets,
           label=np.asarray(labels, np.int64))


def decode(path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  data = np.load(path)
  jpeg, offsets = data['jpeg'].tobytes(), data['offsets']
  images = np.stack([np.asarray(Image.open(io.BytesIO(jpeg[a:b])).convert('RGB'))
                     for a, b in zip(offsets[:-1], offsets[1:])])
  return images, data['label'].astype(np.int32)


def augment(images, rng):
  """CIFAR augmentation on device: zero-pad 4, random 32x32 crop, random flip."""
  n, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  crop_rng, flip_rng = jax.random.split(rng)
  offsets = jax.random.randint(crop_rng, (n, 2), 0, 9)
  crops = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, 3)))(
      padded, offsets)
  flips = jax.random.bernoulli(flip_rng, 0.5, (n,))
  return jnp.where(flips[:, None, None, None], crops[:, :, ::-1], crops)


def main(_):
  if FLAGS.export:
    export(FLAGS.export, FLAGS.export_dataset, FLAGS.export_data_dir)
    return
  t0 = time.time()
  images, labels = decode(FLAGS.data)
  decode_s = time.time() - t0
  n_dev = jax.local_device_count()
  batch, per_device = FLAGS.batch_size, FLAGS.batch_size // n_dev
  train_x = jax.device_put(images[:FLAGS.num_train])
  train_y = jax.device_put(labels[:FLAGS.num_train])
  held_out = slice(FLAGS.num_train, FLAGS.num_train + FLAGS.num_eval)
  eval_x, eval_y = images[held_out], labels[held_out]
  steps_per_epoch = FLAGS.num_train // batch
  spec = teachers.get(FLAGS.name)
  model = spec.module()

  @jax.jit
  def make_batch(idx, rng):
    x = augment(train_x[idx], rng).astype(jnp.float32) / 255.0
    return {'image': x.reshape(n_dev, per_device, *x.shape[1:]),
            'label': train_y[idx].reshape(n_dev, per_device)}

  def build(num_epochs):
    total = num_epochs * steps_per_epoch
    lr_fn = state_lib.learning_rate_schedule(
        FLAGS.learning_rate, total, int(FLAGS.warmup_epochs * steps_per_epoch))
    tx = state_lib.sgd(lr_fn, momentum=0.9, weight_decay=FLAGS.weight_decay)
    state = state_lib.create_train_state(model, jax.random.PRNGKey(FLAGS.seed), 32, tx)
    step = steps_lib.pmap_train_step(learning_rate_fn=lr_fn)
    return flax.jax_utils.replicate(state), step, total

  def run_steps(state, step, start, count, order_rng):
    metrics = None
    for i in range(start, start + count):
      epoch, j = divmod(i, steps_per_epoch)
      if j == 0:
        order = np.random.default_rng([FLAGS.seed, epoch]).permutation(FLAGS.num_train)
      idx = order[j * batch:(j + 1) * batch]
      state, m = step(state, make_batch(idx, jax.random.fold_in(order_rng, i)))
      metrics = m if metrics is None else metrics.merge(m)
    return state, metrics

  # Probe: compile, then time one epoch's worth of steps to size the real run.
  state, step, _ = build(FLAGS.max_epochs)
  rng = jax.random.PRNGKey(FLAGS.seed + 1)
  state, _ = run_steps(state, step, 0, 10, rng)
  jax.block_until_ready(state)
  t = time.time()
  state, _ = run_steps(state, step, 0, steps_per_epoch, rng)
  jax.block_until_ready(state)
  epoch_s = time.time() - t
  num_epochs = int(max(1, min(FLAGS.max_epochs, FLAGS.budget_s // epoch_s)))
  print(f'decode {decode_s:.1f}s; probe epoch {epoch_s:.2f}s '
        f'({steps_per_epoch / epoch_s:.1f} steps/s, {steps_per_epoch * batch / epoch_s:.0f} '
        f'images/s); training {num_epochs} epochs', flush=True)

  state, step, total = build(num_epochs)
  t = time.time()
  for epoch in range(num_epochs):
    state, metrics = run_steps(state, step, epoch * steps_per_epoch, steps_per_epoch, rng)
    if epoch % 10 == 9 or epoch == num_epochs - 1:
      m = flax.jax_utils.unreplicate(metrics).compute()
      elapsed = time.time() - t
      print(f'epoch {epoch + 1}/{num_epochs} loss {m["loss"]:.4f} acc {m["accuracy"]:.4f} '
            f'{elapsed:.0f}s, ETA {elapsed / (epoch + 1) * (num_epochs - epoch - 1):.0f}s',
            flush=True)
  train_s = time.time() - t

  variables = jax.device_get(flax.jax_utils.unreplicate(state).variables)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  logits = np.concatenate([apply(variables, eval_x[i:i + 1000].astype(np.float32) / 255.0)
                           for i in range(0, len(eval_x), 1000)])
  eval_accuracy = float((logits.argmax(-1) == eval_y).mean())
  result = {'epochs': num_epochs, 'steps': total, 'batch_size': batch,
            'learning_rate': FLAGS.learning_rate, 'weight_decay': FLAGS.weight_decay,
            'train_s': round(train_s, 1), 'steps_per_s': round(total / train_s, 1),
            'eval_images': len(eval_y), 'eval_accuracy': eval_accuracy,
            'device': jax.devices()[0].device_kind, 'jax': jax.__version__}
  print(json.dumps(result), flush=True)
  if FLAGS.out:
    teachers.save_trained(FLAGS.out, spec, variables)
    with open(os.path.join(FLAGS.out, 'result.json'), 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  app.run(main)
