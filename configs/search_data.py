"""Config fields every NAS stage shares: the teacher, the searched data, real evaluation."""
import ml_collections
from ml_collections import config_dict

from dfnas_jax.configs import retrain as retrain_config
from dfnas_jax.configs import synthesize as synthesize_config
from dfnas_jax.configs import training

# configs/retrain.py fields that a search stage fills in from its own fields before it
# retrains (dfnas_jax.nas.retraining.retrain_configs), so its `retrain` block has none of them.
SET_BY_THE_SEARCH = ('stage', 'architecture', 'dataset', 'data_dir', 'download', 'train_split',
                     'loss', 'soft_labels', 'teacher', 'teacher_checkpoint', 'eval_dataset',
                     'eval_data_dir', 'eval_split')


def add_teacher_and_data(c: ml_collections.ConfigDict) -> None:
  """The teacher and the data searched on; '' synthesizes WORKDIR/synthesize (reused)."""
  c.seed = 0
  c.teacher = 'cifar10_resnet20'
  c.teacher_checkpoint = ''
  c.dataset = ''
  c.data_dir = config_dict.placeholder(str)
  c.download = True
  c.synthesis = synthesize_config.get_config()
  c.synthesis.images_per_round, c.synthesis.num_rounds = 128, 3  # 384 images, ~2 min on CPU
  # The search network's activations: float32 | bfloat16 (accelerators; params stay float32).
  c.compute_dtype = 'float32'


def add_real_evaluation(c: ml_collections.ConfigDict) -> None:
  """Real-data evaluation of the retrained architecture (eval_dataset '' to skip)."""
  c.eval_dataset = 'cifar10'
  c.eval_data_dir = config_dict.placeholder(str)
  c.eval_split = 'test'


def add_retraining_data(c: ml_collections.ConfigDict) -> None:
  """What a search's found architecture is retrained on: the searched data (synthetic:
  distillation, as searched) and/or a real training split with hard labels and label
  smoothing, as the paper retrains its found architectures."""
  c.retrain_data = 'synthetic'   # synthetic | real | synthetic,real (both numbers reported)
  c.real_dataset = 'cifar10'
  c.real_data_dir = config_dict.placeholder(str)
  c.real_train_split = 'train'
  c.real_augment = 'cifar'
  c.real_label_smoothing = 0.1   # the paper's ImageNet retraining


def add_retraining(c: ml_collections.ConfigDict, preset: str = '', **fields) -> None:
  """c.retrain: how the found architecture is trained from scratch, configs/retrain.py's
  `preset` without the fields the search fills in, updated with `fields`."""
  c.retrain = retrain_config.get_config(preset)
  for key in SET_BY_THE_SEARCH:
    del c.retrain[key]
  c.retrain.update(fields)


def trainer_fields(batch_size, steps, lr, weight_decay, image_size, augment, loss='distillation'):
  """The fields `dfnas_jax.train.trainer.fit` reads (a supernet's or a short retraining's)."""
  c = ml_collections.ConfigDict()
  training.add_sgd(c, batch_size=batch_size, num_epochs=0.0, num_train_steps=steps,
                   learning_rate=lr, warmup_epochs=0.0, lr_schedule='linear', nesterov=False,
                   weight_decay=weight_decay)
  c.loss = loss
  c.label_smoothing = 0.0
  c.temperature = 3.0
  c.image_size = image_size
  c.augment = augment
  c.log_every_steps = 50
  c.eval_every_steps = 10 ** 9
  c.checkpoint_every_steps = 50
  c.keep_checkpoints = 2
  return c
