"""inversion.Settings as configs/synthesize.py sets them, with the fields a test changes."""
from dfnas_jax.configs import synthesize as synthesize_config
from dfnas_jax.synthesis import inversion


def settings(**fields) -> inversion.Settings:
  """The default synthesis config's Settings, with `fields` (config field names) changed."""
  config = synthesize_config.get_config()
  config.update(fields)
  return inversion.settings_from_config(config)
