"""The searches' held-out sets: class-balanced, random by seed, mixing every synthesis round."""
import ml_collections
import numpy as np
import pytest

from dfnas_jax.data import input_pipeline as ip
from dfnas_jax.nas import search_data
from dfnas_jax.synthesis import writer as writer_lib

ROUNDS, PER_ROUND, CLASSES = 3, 20, 4


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  """A synthesis-shaped dataset written round by round: shard r is round r, and each
  round has PER_ROUND // CLASSES images of each target class."""
  directory = str(tmp_path_factory.mktemp('splits') / 'synthetic')
  shards = writer_lib.ShardWriter(directory, ROUNDS, CLASSES, 8)
  rng = np.random.default_rng(0)
  for r in range(ROUNDS):
    shards.write(r, [{'image': rng.integers(0, 255, (8, 8, 3), np.uint8),
                      'logits': np.zeros(CLASSES, np.float32), 'label': (i + r) % CLASSES,
                      'target_label': i % CLASSES, 'round': r} for i in range(PER_ROUND)])
  shards.finalize('test')
  return directory


def _config(dataset, seed=0):
  return ml_collections.ConfigDict(dict(dataset=dataset, data_dir=None, download=False, seed=seed,
                                        train_split='', val_split=''))


def _column(source, feature):
  """`feature` of the rows `source` keeps, read from the whole split."""
  whole = ip.get_source(source.builder.data_dir, source.split)
  return ip.read_column(whole, feature)[list(source.rows)]


def test_class_balanced_rows_per_class_and_fraction():
  labels = np.repeat(np.arange(3), [10, 6, 3])
  kept, held = search_data.class_balanced_rows(labels, 0, per_class=2)
  assert sorted(kept + held) == list(range(len(labels))) and not set(kept) & set(held)
  assert np.bincount(labels[held]).tolist() == [2, 2, 2]
  # The reference's 8 of 10 per class; a class with fewer keeps one image.
  _, held_8 = search_data.class_balanced_rows(labels, 0, per_class=8)
  assert np.bincount(labels[held_8]).tolist() == [8, 5, 2]
  # A function of the seed:
  assert search_data.class_balanced_rows(labels, 0, per_class=2) == (kept, held)
  assert search_data.class_balanced_rows(labels, 1, per_class=2)[1] != held
  _, halves = search_data.class_balanced_rows(labels, 0, fraction=0.5)
  assert np.bincount(labels[halves]).tolist() == [5, 3, 1]
  with pytest.raises(ValueError, match='exactly one of per_class and fraction'):
    search_data.class_balanced_rows(labels, 0)
  with pytest.raises(ValueError, match='per_class >= 1 or fraction in'):
    search_data.class_balanced_rows(labels, 0, fraction=0.8)


@pytest.mark.parametrize('how', [dict(per_class=3), dict(fraction=0.5)])
def test_search_data_holds_out_every_round_and_class(dataset, tmp_path, how):
  data = search_data.load(_config(dataset), str(tmp_path), **how)
  per_class = ROUNDS * PER_ROUND // CLASSES  # 15
  expected_val = CLASSES * (3 if 'per_class' in how else per_class // 2)
  assert data.val.num_examples == expected_val
  assert data.train.num_examples == ROUNDS * PER_ROUND - expected_val
  for source in (data.train, data.val):
    rounds, classes = _column(source, 'round'), _column(source, 'target_label')
    assert set(rounds) == set(range(ROUNDS)), rounds  # every round on both sides
    assert len(set(np.bincount(classes, minlength=CLASSES))) == 1, classes  # balanced
  assert data.info['search_val_split']['rows'] == list(data.val.rows)
  assert data.info['search_val_split']['class_feature'] == 'target_label'
  other = search_data.load(_config(dataset, seed=1), str(tmp_path), **how)
  assert other.val.rows != data.val.rows


def test_subset_sources_read_exactly_their_rows(dataset, tmp_path):
  data = search_data.load(_config(dataset), str(tmp_path), per_class=2)
  labels = _column(data.val, 'label')
  batches = list(ip.eval_batches(data.val, 8, 8, 'none'))
  seen = np.concatenate([b['label'].ravel()[b['mask'].ravel() > 0] for b in batches])
  np.testing.assert_array_equal(seen, labels)
  # Training batches come only from the kept rows: one epoch is a permutation of them.
  kept = _column(data.train, 'label')
  steps = ip.steps_per_epoch(data.train, 4)
  assert steps * 4 == len(kept) == ROUNDS * PER_ROUND - 2 * CLASSES
  stream = ip.train_batches(data.train, 4, 8, 'none', seed=0)
  epoch = np.concatenate([next(stream)['label'].ravel() for _ in range(steps)])
  assert sorted(epoch.tolist()) == sorted(kept.tolist())


def test_explicit_splits_are_used_as_given(dataset, tmp_path):
  config = _config(dataset)
  config.train_split, config.val_split = 'train[:40]', 'train[40:]'
  data = search_data.load(config, str(tmp_path), per_class=3)
  assert (data.train.num_examples, data.val.num_examples) == (40, 20)
  assert data.info['search_val_split'] == 'train[40:]'
  config.val_split = ''
  with pytest.raises(ValueError, match='Set both train_split and val_split'):
    search_data.load(config, str(tmp_path), per_class=3)
