"""Synthesize a dataset from a teacher (recursive label calibration, regional update,
multi-resolution), written as a TFDS dataset under WORKDIR/synthetic.

  python -m dfnas_jax.main --config=configs/synthesize.py        # 512 images, ~6 min on 2 CPU cores
  python -m dfnas_jax.main --config=configs/synthesize.py:smoke  # seconds, for tests
  python -m dfnas_jax.main --config=configs/synthesize.py:fast   # 60 steps per batch, not 300
  python -m dfnas_jax.main --config=configs/synthesize.py:generator  # 28 steps a batch
  python -m dfnas_jax.main --config=configs/synthesize.py:imagenet \
      --config.teacher_checkpoint=resnet50.pth

Ablations: --config.label_calibration=False (hard targets every round),
--config.regional_update=False (canvas = window, random jitter only),
--config.multi_resolution=False, --config.bn_weight=0, --config.method=gaussian_noise.
"""
import ml_collections

PRESETS = ('', 'smoke', 'imagenet', 'fast', 'generator')


def get_config(preset: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = 'synthesize'
  c.teacher = 'cifar10_resnet20'  # zoo name or trained-model directory
  c.teacher_checkpoint = ''       # ImageNet teachers: torchvision .pth/.npz/.safetensors, .msgpack
  c.method = 'inversion'          # inversion | generator | gaussian_noise (teacher-labelled noise)
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
  c.low_res_steps = 100           # steps on the canvas average-pooled by low_res_factor
  c.full_res_steps = 200

  # Adam with warm-up + cosine, reset per resolution stage.
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
  # (dfnas_jax/synthesis/generator.py); the steps above are each batch's, the first's x warmup.
  c.generator = ml_collections.ConfigDict()
  c.generator.latent_dim = 128
  c.generator.channels = 32
  c.generator.lr = 5e-3           # Adam on its weights (the schedule and betas above)
  c.generator.latent_lr = 0.05    # Adam on the latents
  c.generator.meta_step = 1.0     # carried <- carried + meta_step (adapted - carried)
  c.generator.warmup = 5

  c.chunk_steps = 50              # steps per device dispatch (host looks at losses between)
  c.preview_images = 32

  if preset == 'smoke':
    c.images_per_round, c.num_rounds, c.batch_size = 16, 2, 8
    c.low_res_steps, c.full_res_steps, c.warmup_steps, c.chunk_steps = 4, 6, 2, 3
    c.preview_images = 8
  elif preset == 'fast':  # a fifth of the steps, a fifth of the cost (docs/data_quality.md)
    c.low_res_steps, c.full_res_steps, c.warmup_steps = 40, 20, 5
  elif preset == 'generator':  # a carried generator: few steps a batch (docs/data_quality.md)
    c.method = 'generator'
    c.low_res_steps, c.full_res_steps, c.warmup_steps = 16, 12, 2
    c.generator.channels = 16
  elif preset == 'imagenet':
    c.teacher = 'resnet50'
    c.images_per_round, c.num_rounds, c.batch_size = 1000, 10, 100
    c.canvas, c.window, c.jitter = 256, 224, 30
    c.low_res_steps, c.full_res_steps, c.warmup_steps = 2000, 3000, 100
    c.chunk_steps = 100
  elif preset:
    raise ValueError(f'Unknown preset {preset!r} for synthesize; presets: {PRESETS}')
  return c
