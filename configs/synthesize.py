"""Synthesize a dataset from a teacher (recursive label calibration, regional update,
multi-resolution), written as a TFDS dataset under WORKDIR/synthetic.

  python -m dfnas_jax.main --config=configs/synthesize.py            # 512 images, generator
  python -m dfnas_jax.main --config=configs/synthesize.py:inversion  # per-image inversion
  python -m dfnas_jax.main --config=configs/synthesize.py:fast       # the same, 60 steps a batch
  python -m dfnas_jax.main --config=configs/synthesize.py:smoke      # seconds, for tests
  python -m dfnas_jax.main --config=configs/synthesize.py:imagenet \
      --config.teacher_checkpoint=resnet50.pth

Ablations: --config.label_calibration=False (hard targets every round),
--config.regional_update=False (canvas = window, random jitter only),
--config.multi_resolution=False, --config.bn_weight=0, --config.method=gaussian_noise.

The default method is the generator: per CPU-second and per image it made the best students
of the methods measured on CIFAR-10 (docs/data_quality.md, "Scaling"). Each method has its
own steps: the top-level ones are the per-image inversion's, `generator.*_steps` the
generator's.
"""
import ml_collections

PRESETS = ('', 'smoke', 'imagenet', 'inversion', 'fast', 'generator')


def get_config(preset: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = 'synthesize'
  c.teacher = 'cifar10_resnet20'  # zoo name or trained-model directory
  c.teacher_checkpoint = ''       # ImageNet teachers: torchvision .pth/.npz/.safetensors, .msgpack
  c.method = 'generator'          # generator | inversion | gaussian_noise (teacher-labelled noise)
  c.seed = 0
  c.output_dir = ''               # default WORKDIR/synthetic

  # How many images: num_rounds x images_per_round, made batch_size at a time.
  c.images_per_round = 256
  c.num_rounds = 2
  c.batch_size = 128

  # The method's components.
  c.label_calibration = True      # rounds > 0 aim at softmax(previous round's logits)
  c.regional_update = True        # optimize a canvas, show the teacher random windows of it
  c.canvas = 40
  c.window = 32
  c.jitter = 2                    # random roll (pixels) when regional_update is off
  c.flip = True
  c.multi_resolution = True
  c.low_res_factor = 2
  # method='inversion': each batch's steps on the canvas average-pooled by low_res_factor,
  # then at full resolution (multi_resolution=False: all at full resolution).
  c.low_res_steps = 100
  c.full_res_steps = 200

  # Adam with warm-up + cosine, reset per resolution stage (lr: inversion's, on the pixels).
  c.lr = 0.25
  c.beta1 = 0.5
  c.beta2 = 0.9
  c.eps = 1e-8
  # Linear warm-up from 0 (step 0 does not move the canvas; the reference's starts at
  # lr / warmup_steps). Kept: Adam's first step moves every pixel by +-lr whatever its
  # gradient's size, so starting at lr / warmup turned float-level differences (1e-6 in
  # round-0 logits, 1 vs 2 devices) into round-1 images up to 82/255 apart; from 0, <= 1/255.
  c.warmup_steps = 20

  # Loss = main + bn * R_feature + tv_l2 * TV_l2 + tv_l1 * TV_l1 + l2 * ||x||.
  c.main_weight = 1.0
  c.bn_weight = 0.01
  c.first_bn_multiplier = 10.0
  c.tv_l2_weight = 1e-4
  c.tv_l1_weight = 0.0
  c.l2_weight = 1e-5
  # The batch the BN statistics and the TV-l2 norm are taken over: 'global' (all batch_size
  # images, across the local devices) | 'device' (each device's shard). Global by default:
  # the reference inverts each whole batch on one GPU, and so the dataset does not depend on
  # the device count (with 'device', 8 devices at batch 128 match statistics of 16 images).
  c.loss_batch = 'global'

  # The teacher's activations: float32 | bfloat16 (accelerators; canvas, Adam and the loss
  # terms stay float32).
  c.compute_dtype = 'float32'

  # method='generator': a small generator, carried from batch to batch, makes the canvases
  # (dfnas_jax/synthesis/generator.py). Its own steps per batch (the first batch, from random
  # weights, runs first_batch_factor times them) and warm-up; the betas above.
  c.generator = ml_collections.ConfigDict()
  c.generator.latent_dim = 128
  c.generator.channels = 16       # 32 was worse and 2-3x costlier (docs/data_quality.md)
  c.generator.lr = 5e-3           # Adam on its weights
  c.generator.latent_lr = 0.05    # Adam on the latents
  c.generator.meta_step = 1.0     # carried <- carried + meta_step (adapted - carried)
  c.generator.low_res_steps = 16
  c.generator.full_res_steps = 12
  c.generator.warmup_steps = 2
  c.generator.first_batch_factor = 5

  c.chunk_steps = 50              # steps per device dispatch (host looks at losses between)
  c.preview_images = 32

  if preset == 'smoke':
    # The per-image inversion: the least compilation for the stages' end-to-end tests
    # (tests/test_synthesis.py runs the generator's smoke too).
    c.method = 'inversion'
    c.images_per_round, c.num_rounds, c.batch_size = 16, 2, 8
    c.low_res_steps, c.full_res_steps, c.warmup_steps, c.chunk_steps = 4, 6, 2, 3
    c.generator.update(low_res_steps=4, full_res_steps=6, warmup_steps=2, first_batch_factor=2)
    c.preview_images = 8
  elif preset == 'inversion':  # the per-image reference method (the paper's)
    c.method = 'inversion'
  elif preset == 'fast':  # the inversion with a fifth of the steps (docs/data_quality.md)
    c.method = 'inversion'
    c.low_res_steps, c.full_res_steps, c.warmup_steps = 40, 20, 5
  elif preset == 'generator':  # the default; the name the curve's commands use
    pass
  elif preset == 'imagenet':  # the paper's per-image inversion (the curve is CIFAR-10's)
    c.method = 'inversion'
    c.teacher = 'resnet50'
    c.images_per_round, c.num_rounds, c.batch_size = 1000, 10, 100
    c.canvas, c.window, c.jitter = 256, 224, 30
    c.low_res_steps, c.full_res_steps, c.warmup_steps = 2000, 3000, 100
    c.chunk_steps = 100
  elif preset:
    raise ValueError(f'Unknown preset {preset!r} for synthesize; presets: {PRESETS}')
  return c
