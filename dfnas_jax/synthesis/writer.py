"""The synthetic dataset on disk: TFDS-format sharded TFRecords, one shard per batch.

A shard is written to a temporary name and renamed when complete, so a shard
that exists is whole: a killed run resumes at the first missing shard and never
duplicates a record. `finalize` adds the TFDS metadata once all shards exist;
then `tfds.builder_from_directory(directory)` loads the dataset.
"""
import glob
import os
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

DATASET_NAME = 'synthetic'
SPLIT = 'train'


def features(num_classes: int, image_size: int) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(image_size, image_size, 3), encoding_format='png'),
      'logits': tfds.features.Tensor(shape=(num_classes,), dtype=np.float32),
      'label': tfds.features.ClassLabel(num_classes=num_classes),
      'target_label': tfds.features.ClassLabel(num_classes=num_classes),
      'round': tfds.features.Scalar(dtype=np.int32),
  })


class ShardWriter:
  def __init__(self, directory: str, num_shards: int, num_classes: int, image_size: int):
    self.directory = directory
    self.num_shards = num_shards
    self.features = features(num_classes, image_size)
    self.template = tfds.core.ShardedFileTemplate(
        data_dir=directory, dataset_name=DATASET_NAME, split=SPLIT, filetype_suffix='tfrecord')
    os.makedirs(directory, exist_ok=True)

  def path(self, shard: int) -> str:
    return os.fspath(self.template.sharded_filepath(shard_index=shard, num_shards=self.num_shards))

  def exists(self, shard: int) -> bool:
    return os.path.exists(self.path(shard))

  def _remove_partial(self, pattern: str) -> None:
    """Deletes what a killed run left half-written."""
    for path in glob.glob(pattern):
      os.remove(path)

  def write(self, shard: int, examples: List[Dict[str, np.ndarray]]) -> None:
    final = self.path(shard)
    self._remove_partial(f'{final}.tmp-*')
    tmp = f'{final}.tmp-{os.getpid()}'
    with tf.io.TFRecordWriter(tmp) as w:
      for example in examples:
        w.write(self.features.serialize_example(example))
    os.replace(tmp, final)

  def read(self, shard: int) -> Dict[str, np.ndarray]:
    """All examples of a complete shard, stacked; a corrupt shard is a clear error."""
    path = self.path(shard)
    try:
      records = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
      decoded = [self.features.deserialize_example_np(r) for r in records]
    except Exception as e:  # tf raises DataLossError etc. from deep inside
      raise ValueError(f'Synthetic shard {path} is corrupt or not a synthesis shard ({e}). '
                       'Delete it to have it synthesized again.') from e
    return {k: np.stack([np.asarray(d[k]) for d in decoded]) for k in decoded[0]}

  def finalize(self, description: str, metadata: Optional[Dict] = None) -> None:
    """Writes the TFDS metadata; call once, after every host wrote its shards."""
    self._remove_partial(os.path.join(self.directory, '*.tmp-*'))
    shard_lengths = [sum(1 for _ in tf.data.TFRecordDataset(self.path(i)))
                     for i in range(self.num_shards)]
    split = tfds.core.SplitInfo(
        name=SPLIT, shard_lengths=shard_lengths, filename_template=self.template,
        num_bytes=sum(os.path.getsize(self.path(i)) for i in range(self.num_shards)))
    tfds.folder_dataset.write_metadata(
        data_dir=self.directory, features=self.features, split_infos=[split],
        filename_template=self.template, description=description,
        metadata=tfds.core.MetadataDict(metadata or {}), check_data=True)
