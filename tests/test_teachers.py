import flax.jax_utils
import jax
import numpy as np
import pytest

from dfnas_jax import models, teachers
from dfnas_jax import workdir as wd
from dfnas_jax.data import input_pipeline as ip
from dfnas_jax.train import state as state_lib
from dfnas_jax.train import trainer
from tests import model_counts


def _num_params(name, num_classes):
  model = models.build_model(name, num_classes)  # shapes only: nothing is compiled
  variables = jax.eval_shape(lambda: state_lib.init_variables(model, jax.random.PRNGKey(0), 32))
  return model_counts.num_params(variables)


def test_parameter_counts():
  # ResNet-20 with 1x1-conv shortcuts, by hand: stem 432+32; layer1 3*(2*2304+2*32);
  # layer2 (4608+9216+512 + 3*64) + 2*(2*9216+2*64); layer3 (18432+36864+2048 + 3*128)
  # + 2*(2*36864+2*128); fc 64*10+10.
  assert _num_params('cifar_resnet20', 10) == 464 + 14016 + 51648 + 205696 + 650 == 272474
  # torchvision's published sizes.
  assert _num_params('resnet18', 1000) == 11_689_512
  assert _num_params('resnet50', 1000) == 25_557_032


def test_unknown_names_list_the_known_ones():
  with pytest.raises(ValueError, match=r"Unknown teacher 'resnet9'.*cifar10_resnet20"):
    teachers.get('resnet9')
  with pytest.raises(ValueError, match=r"Unknown architecture 'vgg'.*cifar_resnet20"):
    models.build_model('vgg', 10)


def test_imagenet_teacher_needs_a_checkpoint():
  with pytest.raises(ValueError, match='ships no weights: pass a checkpoint'):
    teachers.load('resnet50')


def test_trained_model_directory_round_trip(tmp_path):
  spec = teachers.Teacher('tiny', 'cifar_resnet8', 10, 16, None)
  variables = state_lib.init_variables(spec.module(), jax.random.PRNGKey(1), 16)
  teachers.save_trained(str(tmp_path), spec, variables)
  module, loaded, loaded_spec = teachers.load(str(tmp_path))
  assert loaded_spec.architecture == 'cifar_resnet8' and loaded_spec.image_size == 16
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, jax.device_get(variables))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='has no model.json'):
    teachers.load(str(tmp_path / 'empty'))


def test_bad_weight_files_are_clear_errors(tmp_path):
  spec = teachers.get('cifar10_resnet20')
  corrupt = tmp_path / 'corrupt.msgpack'
  corrupt.write_bytes(b'\x00not msgpack at all')
  with pytest.raises(ValueError, match='not a msgpack file of model variables'):
    teachers.load('cifar10_resnet20', checkpoint=str(corrupt))
  wrong = tmp_path / 'wrong.msgpack'
  wd.save_variables(str(wrong), state_lib.init_variables(
      models.build_model('cifar_resnet8', 10), jax.random.PRNGKey(0), 32))
  with pytest.raises(ValueError, match=r'(?s)do not match the model .*missing: params/layer1_1'):
    teachers.load(spec.name, checkpoint=str(wrong))
  with pytest.raises(FileNotFoundError, match='not found'):
    teachers.load(spec.name, checkpoint=str(tmp_path / 'absent.msgpack'))


def test_shipped_cifar10_teacher_is_accurate(data_dir):
  """The packaged weights load offline and classify held-out CIFAR-10 images.

  A regression guard on the shipped file (its model card: 88.1% on train[45000:], 87.0% on
  these 1,000 images); random or mis-converted weights score about 10%.
  """
  module, variables, spec = teachers.load('cifar10_resnet20')
  source = ip.get_source('cifar10_jpeg', 'train[45000:46000]', data_dir, download=False)
  results = trainer.evaluate(flax.jax_utils.replicate(variables), source, 500, spec.image_size,
                             'cifar', apply_fn=module.apply)
  assert results['accuracy'] >= 0.865, results
