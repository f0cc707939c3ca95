"""The SGD schedule that `dfnas_jax.train.trainer.fit` reads, for every stage that trains."""
import ml_collections


def add_sgd(c: ml_collections.ConfigDict, *, batch_size: int = 128, num_epochs: float = 30.0,
            num_train_steps: int = -1, learning_rate: float = 0.1, warmup_epochs: float = 1.0,
            lr_schedule: str = 'cosine', nesterov: bool = True,
            weight_decay: float = 5e-4) -> None:
  """Seed, batch size, length, SGD (momentum 0.9), its learning-rate schedule, clipping and
  weight decay."""
  c.seed = 0
  c.batch_size = batch_size
  c.num_epochs = num_epochs
  c.num_train_steps = num_train_steps  # > 0 overrides num_epochs
  c.learning_rate = learning_rate
  c.warmup_epochs = warmup_epochs
  c.lr_schedule = lr_schedule          # cosine | linear
  c.momentum = 0.9
  c.nesterov = nesterov
  c.grad_clip = 0.0                    # global-norm clipping of the gradient; <= 0: none
  c.weight_decay = weight_decay
