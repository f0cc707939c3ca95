"""config.stage -> the module whose `run(config, workdir)` carries it out."""
import importlib

STAGES = {
    'teacher': 'dfnas_jax.train.teacher',
    'evaluate': 'dfnas_jax.evaluation.evaluate',
    'synthesize': 'dfnas_jax.synthesis.synthesize',
    'retrain': 'dfnas_jax.train.retrain',
    'spos': 'dfnas_jax.nas.spos',
    'darts': 'dfnas_jax.nas.darts',
    'proxylessnas': 'dfnas_jax.nas.proxyless',
    'rank_correlation': 'dfnas_jax.evaluation.rank_correlation',
    'zero_cost_study': 'dfnas_jax.evaluation.zero_cost_study',
    'zero_shot': 'dfnas_jax.nas.zero_shot',
}


def _module(config):
  if config.stage not in STAGES:
    raise ValueError(f'Unknown stage {config.stage!r}; known stages: {sorted(STAGES)}')
  return importlib.import_module(STAGES[config.stage])


def check(config) -> None:
  """The stage's config checks alone (its `run` starts with them): no data or weights
  are read and nothing is trained."""
  _module(config).check_config(config)


def run(config, workdir: str):
  return _module(config).run(config, workdir)
