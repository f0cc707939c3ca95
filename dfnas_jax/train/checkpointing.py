"""Orbax checkpoint manager: periodic saves, resume from the latest step."""
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


def manager(directory: str, max_to_keep: int = 2,
            save_interval_steps: int = 1) -> ocp.CheckpointManager:
  """A manager over `directory`; orbax writes to a temporary name and renames when complete."""
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True))


def restore_latest(mngr: ocp.CheckpointManager, target: Any) -> Optional[Any]:
  """Restores the latest checkpoint into the structure of `target`, or None if there is none.

  A checkpoint whose tree or shapes differ from `target` (e.g. a workdir reused
  with another model or config) is reported as one error naming the directory.
  """
  step = mngr.latest_step()
  if step is None:
    return None
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
        f'Checkpoint at step {step} in {mngr.directory} does not match this run '
        f'(different model or config?). Use a fresh workdir. Cause: {e}') from e


def save(mngr: ocp.CheckpointManager, step: int, state: Any, force: bool = False) -> bool:
  return mngr.save(step, args=ocp.args.StandardSave(state), force=force)
