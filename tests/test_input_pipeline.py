import os
import shutil

import jax
import numpy as np
import pytest

from dfnas_jax.data import input_pipeline as ip
from dfnas_jax.synthesis.writer import ShardWriter


@pytest.fixture(scope='module')
def source(data_dir):
  return ip.get_source('cifar10_jpeg', 'train[:200]', data_dir, download=False)


def test_source_metadata(source):
  assert source.num_examples == 200
  assert source.num_classes == 10
  assert not source.has_logits


@pytest.mark.parametrize('augment', ['cifar', 'imagenet', 'crop', 'none'])
def test_train_batches_shape_and_range(source, augment):
  batch = next(ip.train_batches(source, 32, 24, augment, seed=0))
  n = jax.local_device_count()
  assert batch['image'].shape == (n, 32 // n, 24, 24, 3)
  assert batch['image'].dtype == np.float32
  assert batch['label'].shape == (n, 32 // n)
  assert 0.0 <= batch['image'].min() and batch['image'].max() <= 1.0
  assert batch['image'].std() > 0.05  # real pixels, not padding


def test_training_order_is_a_function_of_step(source):
  """Restarting at step k yields exactly the k-th batch: resume sees no new or repeated data."""
  steps_per_epoch = ip.steps_per_epoch(source, 32)  # 6
  stream = ip.train_batches(source, 32, 32, 'cifar', seed=3)
  batches = [next(stream) for _ in range(steps_per_epoch + 2)]
  for k in (2, steps_per_epoch + 1):  # within the first epoch and after the epoch boundary
    resumed = next(ip.train_batches(source, 32, 32, 'cifar', seed=3, start_step=k))
    np.testing.assert_array_equal(resumed['image'], batches[k]['image'])
    np.testing.assert_array_equal(resumed['label'], batches[k]['label'])
  # One epoch visits each example once; the next epoch uses another order.
  first_epoch = np.concatenate([b['label'].ravel() for b in batches[:steps_per_epoch]])
  assert len(first_epoch) == 192
  assert not np.array_equal(batches[0]['label'], batches[steps_per_epoch]['label'])
  other_seed = next(ip.train_batches(source, 32, 32, 'cifar', seed=4))
  assert not np.array_equal(other_seed['image'], batches[0]['image'])


def test_eval_batches_cover_split_once_with_mask(source):
  batches = list(ip.eval_batches(source, 64, 32, 'cifar'))
  assert len(batches) == ip.num_eval_batches(source, 64) == 4
  mask = np.concatenate([b['mask'].ravel() for b in batches])
  assert mask.sum() == 200 and mask[:200].all() and not mask[200:].any()
  again = list(ip.eval_batches(source, 64, 32, 'cifar'))
  np.testing.assert_array_equal(batches[1]['image'], again[1]['image'])


def test_hosts_read_disjoint_shards(source, monkeypatch):
  """With 2 processes each host reads its own half; together they cover the split once."""
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax, 'device_count', lambda: 2 * jax.local_device_count())
  seen = []
  for host in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda host=host: host)
    images = np.concatenate([b['image'][b['mask'] > 0] for b in
                             ip.eval_batches(source, 64, 32, 'cifar')])
    seen.append({img.tobytes() for img in images})
    assert len(images) == 100
    assert ip.host_batch_size(64) == 32
  assert not seen[0] & seen[1]


def test_clear_errors(source, data_dir, monkeypatch):
  with pytest.raises(ValueError, match='fewer than one batch of 1000'):
    ip.steps_per_epoch(source, 1000)
  monkeypatch.setattr(jax, 'device_count', lambda: 2)
  with pytest.raises(ValueError,
                     match=r'batch_size=33 must be divisible by the number of devices \(2\)'):
    ip.host_batch_size(33)
  with pytest.raises(ValueError, match="Split 'validation' does not exist"):
    ip.get_source('cifar10_jpeg', 'validation', data_dir, download=False)
  with pytest.raises(ValueError, match=r"Split 'train\[5:5\]' of dataset 'cifar10_jpeg' is empty"):
    ip.get_source('cifar10_jpeg', 'train[5:5]', data_dir, download=False)
  with pytest.raises(ValueError, match="neither a registered TFDS dataset"):
    ip.get_source('no_such_dataset', 'train', data_dir, download=False)
  with pytest.raises(ValueError, match='augment must be one of'):
    next(ip.train_batches(source, 32, 32, 'mixup', seed=0))


def _tiny_dataset(directory, shard_sizes):
  writer = ShardWriter(str(directory), len(shard_sizes), num_classes=3, image_size=4)
  for shard, size in enumerate(shard_sizes):
    writer.write(shard, [{'image': np.zeros((4, 4, 3), np.uint8), 'label': i % 3,
                          'target_label': i % 3, 'logits': np.zeros(3, np.float32), 'round': 0}
                         for i in range(size)])
  writer.finalize('test data')
  return writer


def test_truncated_foreign_or_missing_shards_are_named_before_reading(tmp_path):
  writer = _tiny_dataset(tmp_path / 'data', [3, 3, 3])
  assert ip.get_source(str(tmp_path / 'data'), 'train').num_examples == 9
  other = _tiny_dataset(tmp_path / 'other', [2, 2, 2])

  truncated = writer.path(1)
  with open(truncated, 'r+b') as f:
    f.truncate(os.path.getsize(truncated) - 5)
  with pytest.raises(ValueError, match=rf'{truncated} \(ends inside a record; expected 3'):
    ip.get_source(str(tmp_path / 'data'), 'train[:2]')  # its first file is whole

  shutil.copy(other.path(1), writer.path(1))
  with pytest.raises(ValueError, match=rf'{writer.path(1)} \(2 records, expected 3\)'):
    ip.get_source(str(tmp_path / 'data'), 'train')

  os.remove(writer.path(2))
  with pytest.raises(ValueError, match=rf'missing 1 of its 3 files, e.g. {writer.path(2)}'):
    ip.get_source(str(tmp_path / 'data'), 'train')
