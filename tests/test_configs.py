"""Every preset of every stage passes its stage's checks; bad combinations fail at config time."""
import importlib
import os

import pytest

from dfnas_jax import stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, 'configs'))
                 if f.endswith('.py') and f not in ('__init__.py', 'search_data.py', 'training.py'))


def _config(name, preset=''):
  config = importlib.import_module(f'dfnas_jax.configs.{name}').get_config(preset)
  if config.get('space', '').startswith('nb201'):
    config.benchmark_table = 'cifar10.json'  # the flag these presets' commands pass
  return config


def test_every_stage_config_has_presets():
  assert {c: importlib.import_module(f'dfnas_jax.configs.{c}').PRESETS[0] for c in CONFIGS} == {
      c: '' for c in CONFIGS}
  assert len(CONFIGS) == len(stages.STAGES)


@pytest.mark.parametrize('name, preset', [
    (name, preset) for name in CONFIGS
    for preset in importlib.import_module(f'dfnas_jax.configs.{name}').PRESETS])
def test_every_preset_passes_its_stage_checks(name, preset):
  stages.check(_config(name, preset))


def test_unknown_preset_names_the_presets():
  with pytest.raises(ValueError, match=r"Unknown preset 'huge' for spos; presets: \('', "):
    _config('spos', 'huge')


@pytest.mark.parametrize('name, field', [
    ('spos', 'val_per_class'), ('proxylessnas', 'val_per_class')])
def test_holding_out_more_than_the_synthesis_makes_fails_at_config_time(name, field):
  config = _config(name)
  made = config.synthesis.images_per_round * config.synthesis.num_rounds // 10
  config[field] = made - 1
  stages.check(config)
  config[field] = made
  with pytest.raises(ValueError, match=f'{field}={made} holds out all {made} images'):
    stages.check(config)


@pytest.mark.parametrize('name', ['spos', 'darts', 'proxylessnas'])
def test_stored_soft_labels_must_label_the_trained_view(name):
  config = _config(name)
  config.soft_labels, config.loss = 'stored', 'distillation'
  config.synthesis.regional_update = True  # 40 px canvases labelled on their centre 32 px
  with pytest.raises(ValueError, match="soft_labels='stored' cannot teach the synthesized data"):
    stages.check(config)
  config.soft_labels = 'teacher'
  stages.check(config)


def test_stored_soft_labels_of_whole_windows_pass():
  config = _config('darts')
  config.soft_labels, config.augment, config.image_size = 'stored', 'none', 16
  config.synthesis.regional_update = False  # the stored image is the labelled window
  stages.check(config)
  config.augment = 'cifar'  # shifted crops: not the labelled view
  with pytest.raises(ValueError, match="augment='cifar' at image_size=16 trains on views"):
    stages.check(config)


def test_the_zero_cost_study_refuses_more_batch_images_than_a_source_holds():
  config = _config('zero_cost_study')  # 256 synthetic images; 25 real ones per class
  config.update(num_batches=4, sources='full,real_same_count')
  with pytest.raises(ValueError, match="256 images, more than the 250 source 'real_same_count'"):
    stages.check(config)
  config.sources = 'full'  # exactly enough
  stages.check(config)


def test_the_zero_cost_study_scores_every_estimator_unless_told_fewer():
  from dfnas_jax.nas import zero_cost as zc
  config = _config('zero_cost_study')
  assert tuple(config.estimators.split(',')) == zc.ESTIMATORS
  config.estimators = 'naswot,nope'
  with pytest.raises(ValueError, match="estimators='naswot,nope': one or more of"):
    stages.check(config)


def test_a_bad_teacher_fails_at_config_time(tmp_path):
  config = _config('synthesize')
  config.teacher = str(tmp_path)
  with pytest.raises(FileNotFoundError, match='has no model.json'):
    stages.check(config)


@pytest.mark.parametrize('name', ['spos', 'darts', 'proxylessnas', 'rank_correlation'])
def test_the_stages_teacher_reaches_every_phase(name, tmp_path):
  from dfnas_jax.nas import retraining, search_data
  config = _config(name, 'smoke')
  config.teacher, config.teacher_checkpoint = str(tmp_path / 'mine'), str(tmp_path / 'w.pth')
  synthesis = search_data.synthesis_config(config)
  assert (synthesis.teacher, synthesis.teacher_checkpoint) == (config.teacher,
                                                               config.teacher_checkpoint)
  if name != 'rank_correlation':
    config.retrain_data = 'synthetic,real'
    for rc in retraining.retrain_configs(config, 'cifar_resnet8', 'data', 'distillation').values():
      assert (rc.teacher, rc.teacher_checkpoint) == (config.teacher, config.teacher_checkpoint)


SEARCHES = ('spos', 'darts', 'proxylessnas')


@pytest.mark.parametrize('name, preset', [
    (name, preset) for name in SEARCHES
    for preset in importlib.import_module(f'dfnas_jax.configs.{name}').PRESETS
    if preset != 'imagenet'])
def test_retraining_on_the_real_training_split_fits_its_schedule(name, preset, data_dir):
  """retrain_data='synthetic,real' with the preset's schedule: its warm-up, counted in
  epochs of CIFAR-10's 50,000 training images, is shorter than its steps."""
  from dfnas_jax.data import input_pipeline as ip
  from dfnas_jax.train import trainer
  config = _config(name, preset)
  assert config.real_dataset == 'cifar10'
  source = ip.get_source('cifar10_jpeg', config.real_train_split, data_dir, False)
  assert source.num_examples == 50_000
  _, total, warmup = trainer.schedule_steps(config.retrain, source)
  assert 0 <= warmup < total


@pytest.mark.parametrize('name, preset', [
    (name, preset) for name in SEARCHES
    for preset in importlib.import_module(f'dfnas_jax.configs.{name}').PRESETS])
def test_a_searchs_retrain_block_holds_only_what_the_search_does_not_set(name, preset):
  """The search names the retrained architecture, its data, teacher and evaluation itself,
  so its `retrain` block has no such field: `--config.retrain.teacher=...` is an unknown
  field, not silently overwritten. The retrain stage still gets every field it has."""
  from dfnas_jax.configs import retrain as retrain_config
  from dfnas_jax.configs import search_data
  from dfnas_jax.nas import retraining
  config = _config(name, preset)
  assert not set(search_data.SET_BY_THE_SEARCH) & set(config.retrain.keys())
  config.retrain_data, config.download = 'synthetic,real', False
  for rc in retraining.retrain_configs(config, 'cifar_resnet8', 'data', 'distillation').values():
    assert set(rc.keys()) >= set(retrain_config.get_config().keys())
    assert (rc.stage, rc.architecture, rc.download) == ('retrain', 'cifar_resnet8', False)
