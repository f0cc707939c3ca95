"""tf.data input pipelines for TFDS image-classification datasets.

Real datasets (`cifar10`, `imagenet2012`, an offline copy such as `cifar10_jpeg`)
and the synthetic datasets written by the synthesis stage are read the same way.

Batches are dicts of numpy arrays shaped `[local_devices, per_device_batch, ...]`
for `jax.pmap`: `image` (float32 in [0, 1]), `label` (int32), `logits` (float32,
synthetic data only) and, for evaluation, `mask` (1 for real examples, 0 for
padding). Training order and augmentation are a pure function of (seed, step), so
a resumed run sees exactly the batches an uninterrupted run would have seen.
"""
import dataclasses
import math
import os
import re
import struct
from typing import Dict, Iterator, Optional, Sequence, Tuple

import jax
import numpy as np
import requests
import tensorflow as tf
import tensorflow_datasets as tfds

Batch = Dict[str, np.ndarray]
AUGMENTATIONS = ('cifar', 'imagenet', 'crop', 'none')


@dataclasses.dataclass(frozen=True)
class DataSource:
  """A TFDS dataset split, resolved and validated once.

  `rows`, if set, keeps only those positions of the split (in its file order):
  subsets no TFDS split string can express, such as a class-balanced random
  held-out set (see `subset`).
  """
  builder: tfds.core.DatasetBuilder
  split: str
  num_examples: int   # in the whole split (or of `rows`), over all hosts
  num_classes: int
  rows: Optional[Tuple[int, ...]] = None

  @property
  def has_logits(self) -> bool:
    return 'logits' in self.builder.info.features


def get_builder(name: str, data_dir: Optional[str] = None, download: bool = True,
                split: str = '', fields: str = '', skip: str = '') -> tfds.core.DatasetBuilder:
  """Builder for a registered TFDS name, a dataset under `data_dir`, or a directory.

  `name` may be a path to a dataset directory (e.g. a synthetic dataset), a name
  known to TFDS (downloaded and prepared on first use when `download`), or a
  dataset already prepared under `data_dir` that this TFDS does not know. A download
  whose host cannot be reached fails at once, naming the `split` wanted, the config
  fields that point at a prepared copy (`fields` + 'dataset', 'data_dir') and `skip`,
  the setting that does without the data, if any.
  """
  if os.path.isdir(name):
    return tfds.builder_from_directory(name)
  if name.startswith(('/', './', '../', '~')):
    raise ValueError(f'Dataset directory {name} does not exist; expected a TFDS dataset '
                     "directory (e.g. a synthesize stage's WORKDIR/synthetic) or a TFDS name.")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f'Dataset {name!r} is neither a registered TFDS dataset nor '
                     f'prepared under data_dir={data_dir!r}.') from e
  if not builder.is_prepared():
    if not download:
      raise ValueError(f'Dataset {name!r} is not prepared under data_dir={data_dir!r} '
                       'and download is disabled.')
    unreachable = _unreachable(builder)
    if unreachable:
      raise ValueError(
          f'Dataset {name!r} (split {split!r}) is not prepared under data_dir={data_dir!r} and '
          f'its download failed: {unreachable}. Point the stage at a prepared copy with '
          f'--config.{fields}dataset=NAME --config.{fields}data_dir=DIR --config.download=False'
          + (f', or do without it: {skip}.' if skip else '.'))
    builder.download_and_prepare()
  return builder


def _unreachable(builder: tfds.core.DatasetBuilder) -> Optional[str]:
  """Why the first host `builder` downloads from cannot be reached, or None: one request
  without retries (TFDS retries ten times with back-off, minutes without a network)."""
  urls = [u for u in builder.url_infos or () if u.startswith(('http://', 'https://'))]
  if not urls:  # nothing known to check: TFDS reports its own failures
    return None
  try:  # the proxies and certificates TFDS's download would use (requests, environment)
    requests.head(urls[0], timeout=(5, 30), allow_redirects=True).close()
  except (requests.ConnectionError, requests.Timeout) as e:
    reason = (getattr(e.args[0], 'reason', None) if e.args else None) or e
    proxy = getattr(reason, 'original_error', None)  # set when it is the proxy that failed
    # urllib3 prefixes its reasons with the connection object ("HTTPSConnection(...): ").
    why = re.sub(r'^\S*Connection\(.*?\): ', '', str(proxy or reason))
    return f'cannot reach {urls[0]} ({"its proxy: " if proxy else ""}{why})'
  return None


def get_source(name: str, split: str, data_dir: Optional[str] = None, download: bool = True,
               fields: str = '', skip: str = '') -> DataSource:
  """`split` of dataset `name` (see `get_builder`), checked: its features, its examples
  and its files."""
  builder = get_builder(name, data_dir, download, split, fields, skip)
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise ValueError(f'Dataset {name!r} must have `image` and `label` features; '
                     f'it has {sorted(features)}.')
  try:
    num_examples = builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise ValueError(f'Split {split!r} does not exist in dataset {name!r}; '
                     f'splits: {sorted(builder.info.splits)}.') from e
  if num_examples == 0:
    raise ValueError(f'Split {split!r} of dataset {name!r} is empty.')
  check_files(builder, split)
  return DataSource(builder, split, num_examples, features['label'].num_classes)


def check_files(builder: tfds.core.DatasetBuilder, split: str) -> None:
  """Checks, before any reading, that the local TFRecord files of `split` exist and are
  whole: each base split's files must hold the bytes its metadata records (TFDS counts
  the record payloads, this package's writer the files). A mismatch is one error that
  names the truncated or foreign files. Remote files (gs://...) are not checked."""
  if builder.info.file_format.value != 'tfrecord':
    return
  files = {fi.filename for fi in builder.info.splits[split].file_instructions}
  if any('://' in f for f in files):
    return
  missing = sorted(f for f in files if not os.path.isfile(f))
  if missing:
    raise ValueError(f'Split {split!r} of {builder.data_dir} is missing {len(missing)} of its '
                     f'{len(files)} files, e.g. {missing[0]}.')
  for info in builder.info.splits.values():
    instructions = info.file_instructions
    if not files & {fi.filename for fi in instructions} or not info.num_bytes:
      continue
    size = sum(os.path.getsize(fi.filename) for fi in instructions)
    if size in (info.num_bytes, info.num_bytes + _RECORD_FRAMING * info.num_examples):
      continue
    bad = []
    for fi in instructions:
      count = _count_records(fi.filename)
      if count != fi.examples_in_shard:
        n = fi.examples_in_shard
        bad.append(f'{fi.filename} (ends inside a record; expected {n} records)' if count is None
                   else f'{fi.filename} ({count} records, expected {n})')
    raise ValueError(f'Split {info.name!r} of {builder.data_dir}: its files hold {size} bytes '
                     f'but its metadata records {info.num_bytes}; truncated or foreign: '
                     f'{"; ".join(bad) or "no single file (a file was swapped for another)"}.')


_RECORD_FRAMING = 16  # a TFRecord record: length (8 bytes), its CRC (4), payload, CRC (4)


def _count_records(path: str) -> Optional[int]:
  """Whole records in a TFRecord file by their length fields; None if it ends inside one."""
  size, offset, count = os.path.getsize(path), 0, 0
  with open(path, 'rb') as f:
    while offset < size:
      header = f.read(12)
      if len(header) < 12:
        return None
      offset += _RECORD_FRAMING + struct.unpack('<Q', header[:8])[0]
      if offset > size:
        return None
      f.seek(offset)
      count += 1
  return count


def synthetic_view(synthesis) -> Tuple[int, int]:
  """(image side, window) of the images a synthesis config makes (a ConfigDict, or the
  dict a synthetic dataset's metadata records): canvases with regional update, else
  windows; their stored logits are the teacher's on the centre window."""
  side = synthesis['canvas'] if synthesis.get('regional_update') else synthesis['window']
  return int(side), int(synthesis['window'])


def stored_logits_view(source: DataSource) -> Optional[Tuple[int, int]]:
  """`synthetic_view` of a synthetic dataset with stored logits; None for other datasets."""
  config = (source.builder.info.metadata or {}).get('config') or {}
  if not source.has_logits or 'window' not in config:
    return None
  return synthetic_view(config)


def stored_logits_mismatch(augment: str, image_size: int, side: int,
                           window: int) -> Optional[str]:
  """Why the trained view is not the view the stored logits label, or None.

  The stored logits label an image's centre `window`; the student must see that
  view (resized, flipped at most) to be taught consistently (Beyer et al., 2022,
  "Knowledge distillation: A good teacher is patient and consistent").
  """
  if side != window:
    return (f'the images are {side}x{side} canvases whose logits are the teacher\'s on the '
            f'centre {window}x{window} window, but augment={augment!r} trains on '
            + ('the whole canvas resized' if augment in ('none', 'cifar') else 'other views'))
  if augment == 'none' or (augment == 'crop' and image_size == side):
    return None
  return (f'augment={augment!r} at image_size={image_size} trains on views (crops) of the '
          f'{side}x{side} images other than the one the stored logits label')


def subset(source: DataSource, rows: Sequence[int]) -> DataSource:
  """The examples at positions `rows` of `source`'s split (sorted, distinct)."""
  rows = tuple(sorted({int(r) for r in rows}))
  total = source.builder.info.splits[source.split].num_examples
  if source.rows is not None or not rows or rows[0] < 0 or rows[-1] >= total:
    raise ValueError(f'A subset of split {source.split!r} needs rows in [0, {total}) of a '
                     f'whole split; got {len(rows)} rows.')
  return dataclasses.replace(source, num_examples=len(rows), rows=rows)


def read_column(source: DataSource, feature: str) -> np.ndarray:
  """One scalar feature of every example of the whole split, in file order."""
  ds = source.builder.as_dataset(split=source.split, shuffle_files=False,
                                 decoders={'image': tfds.decode.SkipDecoding()})
  return np.array([x[feature] for x in ds.map(lambda ex: {feature: ex[feature]})
                   .as_numpy_iterator()])


def host_batch_size(global_batch_size: int) -> int:
  """Examples per host per step; checks divisibility over hosts and devices."""
  devices = jax.device_count()
  if global_batch_size % devices:
    raise ValueError(f'batch_size={global_batch_size} must be divisible by the number '
                     f'of devices ({devices}).')
  return global_batch_size // jax.process_count()


def steps_per_epoch(source: DataSource, global_batch_size: int) -> int:
  per_host = source.num_examples // jax.process_count()
  steps = per_host // host_batch_size(global_batch_size)
  if steps == 0:
    raise ValueError(f'Split {source.split!r} has {source.num_examples} examples, fewer '
                     f'than one batch of {global_batch_size}.')
  return steps


def _host_examples(source: DataSource, drop_remainder: bool,
                   shuffle_seed: Optional[int] = None) -> tf.data.Dataset:
  """This host's share of the examples, images still encoded; files shuffled by seed."""
  decoders = {'image': tfds.decode.SkipDecoding()}
  if source.rows is None:
    split = tfds.even_splits(source.split, n=jax.process_count(),
                             drop_remainder=drop_remainder)[jax.process_index()]
    return source.builder.as_dataset(
        split=split, shuffle_files=shuffle_seed is not None,
        read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed), decoders=decoders)
  # Positions count in file order, so the files are read in order; hosts take turns.
  keep = np.zeros(source.builder.info.splits[source.split].num_examples, bool)
  keep[list(source.rows)] = True
  keep = tf.constant(keep)
  ds = source.builder.as_dataset(split=source.split, shuffle_files=False, decoders=decoders)
  ds = ds.enumerate().filter(lambda i, _: tf.gather(keep, i)).map(lambda _, ex: ex)
  return ds.shard(jax.process_count(), jax.process_index())


def _decode(example):
  image = example['image']
  if image.dtype == tf.string:  # Stored encoded; decoded after shuffling and skipping.
    image = tf.io.decode_image(image, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _resize(image, size):
  return tf.image.resize(image, (size, size), method='bilinear', antialias=True)


def preprocess_train(image, size: int, augment: str, seed):
  """Random augmentation from a stateless seed; returns float32 in [0, 1]."""
  seeds = tf.random.experimental.stateless_split(seed, 3)
  image = tf.image.convert_image_dtype(image, tf.float32)
  if augment == 'cifar':  # Zero-pad by 1/8 and random-crop back, as in ResNet on CIFAR.
    image = _resize(image, size) if image.shape[0] != size else image
    pad = size // 8
    image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    image = tf.image.stateless_random_crop(image, (size, size, 3), seed=seeds[0])
  elif augment == 'imagenet':  # Random-resized crop, scale (0.08, 1), ratio (3/4, 4/3).
    begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros([0, 0, 4]), seed=seeds[0],
        min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
    image = _resize(tf.slice(image, begin, crop), size)
  elif augment == 'crop':  # Synthetic canvases: every size x size window is an image.
    image = tf.image.stateless_random_crop(image, (size, size, 3), seed=seeds[0])
  elif augment == 'none':
    return tf.clip_by_value(_resize(image, size), 0.0, 1.0)
  else:
    raise ValueError(f'augment must be one of {AUGMENTATIONS}, got {augment!r}')
  image = tf.image.stateless_random_flip_left_right(image, seed=seeds[1])
  return tf.clip_by_value(image, 0.0, 1.0)


def preprocess_eval(image, size: int, augment: str):
  """Deterministic: resize (CIFAR-style), 87.5% centre crop + resize (ImageNet-style)
  or the centre size x size window (crop)."""
  image = tf.image.convert_image_dtype(image, tf.float32)
  if augment == 'imagenet':
    image = tf.image.central_crop(image, 0.875)
  elif augment == 'crop':
    image = tf.image.resize_with_crop_or_pad(image, size, size)
  return tf.clip_by_value(_resize(image, size), 0.0, 1.0)


def _features(example, image):
  out = {'image': image, 'label': tf.cast(example['label'], tf.int32)}
  if 'logits' in example:
    out['logits'] = tf.cast(example['logits'], tf.float32)
  return out


def _to_devices(batch: Batch) -> Batch:
  """[host_batch, ...] -> [local_devices, per_device_batch, ...]."""
  n = jax.local_device_count()
  return {k: v.reshape((n, v.shape[0] // n) + v.shape[1:]) for k, v in batch.items()}


def train_batches(source: DataSource, global_batch_size: int, image_size: int,
                  augment: str, seed: int, start_step: int = 0,
                  shuffle_buffer: int = 50_000) -> Iterator[Batch]:
  """Endless, reproducible training batches starting at `start_step`.

  Each epoch's order comes from (seed, epoch) and each example's augmentation
  from (seed, position in the stream), so restarting at step k skips the first k
  batches without decoding them and yields the same batches as before.
  """
  batch = host_batch_size(global_batch_size)
  steps = steps_per_epoch(source, global_batch_size)
  epoch, skip = divmod(start_step, steps)
  base_seed = seed * 1_000 + jax.process_index()
  # A subset is filtered out of a pass over its whole split: make that pass once and keep
  # the (still encoded) examples in memory for the following epochs.
  subset = _host_examples(source, drop_remainder=True).cache() if source.rows else None
  while True:
    epoch_seed = int(np.random.SeedSequence([base_seed, epoch]).generate_state(1)[0] >> 1)
    ds = (subset if subset is not None
          else _host_examples(source, drop_remainder=True, shuffle_seed=epoch_seed))
    ds = ds.shuffle(shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
    ds = ds.take(steps * batch).skip(skip * batch)
    first = (epoch * steps + skip) * batch

    def prepare(index, example):
      image = preprocess_train(_decode(example), image_size, augment,
                               tf.stack([tf.cast(base_seed, tf.int64), index]))
      return _features(example, image)

    ds = tf.data.Dataset.zip((tf.data.Dataset.range(first, first + (steps - skip) * batch), ds))
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    for host_batch in ds.as_numpy_iterator():
      yield _to_devices(host_batch)
    epoch, skip = epoch + 1, 0


def num_eval_batches(source: DataSource, global_batch_size: int) -> int:
  """Same on every host (pmap collectives need it): the largest host's share."""
  largest_share = math.ceil(source.num_examples / jax.process_count())
  return math.ceil(largest_share / host_batch_size(global_batch_size))


def eval_batches(source: DataSource, global_batch_size: int, image_size: int,
                 augment: str) -> Iterator[Batch]:
  """One pass over the split; the last batches are padded and carry `mask` = 0."""
  batch = host_batch_size(global_batch_size)
  ds = _host_examples(source, drop_remainder=False)
  ds = ds.map(lambda ex: _features(ex, preprocess_eval(_decode(ex), image_size, augment)),
              num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch).prefetch(tf.data.AUTOTUNE)
  template = None
  count = 0
  for host_batch in ds.as_numpy_iterator():
    template = host_batch
    yield _to_devices(_pad(host_batch, batch))
    count += 1
  for _ in range(num_eval_batches(source, global_batch_size) - count):
    yield _to_devices(_pad({k: v[:0] for k, v in template.items()}, batch))


def _pad(host_batch: Batch, size: int) -> Batch:
  n = len(host_batch['label'])
  out = {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)])
         for k, v in host_batch.items()}
  out['mask'] = (np.arange(size) < n).astype(np.float32)
  return out
