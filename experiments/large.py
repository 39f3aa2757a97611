"""A GPU/TPU-sized model: 24 layers, width 1024, on a registered TFDS dataset (lm1b).

About 495M parameters with a 32k vocabulary (153M of them are the score network's adaLN
modulation, which costs FLOPs per sequence, not per token). Launch on a host or slice:

    python -m diffusion_text train --config=experiments/large.py --workdir=/gcs/BUCKET/runs/large

where /gcs/BUCKET is the bucket mounted by experiments/tpu/mount_bucket.sh (docs/tpu.md).

The mesh defaults to pure data parallelism; on a TPU slice, shard parameters with e.g.
`--config.mesh.fsdp=8`. `get_config("cpu")` shrinks it to a size that trains on a laptop, to
check a change end to end before launching:

    python -m diffusion_text train --config=experiments/large.py:cpu --workdir=runs/large_cpu
"""

from diffusion_text import config as config_lib


def get_config(variant: str = ""):
  c = config_lib.base_config()
  c.data.name = "lm1b"
  c.data.seq_len = 256
  c.tokenizer.vocab_size = 32000
  c.tokenizer.max_chars = 50_000_000
  c.model.embed_dim = 128
  c.model.width = 1024
  c.model.num_layers = 24
  c.model.num_heads = 16
  c.model.mlp_dim = 4096
  c.model.dtype = "bfloat16"
  c.train.steps = 500_000
  c.train.batch_size = 512
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 10_000
  c.train.eval_every = 5000
  c.train.eval_batches = 64
  c.train.sample_every = 10_000
  c.train.checkpoint_every = 5000
  c.train.keep_checkpoints = 3
  c.train.log_every = 100
  c.sample.steps = 256
  c.mesh.data = -1
  c.mesh.fsdp = 1

  if variant == "cpu":
    c.data.name = "shakespeare"
    c.data.seq_len = 64
    c.tokenizer.vocab_size = 1024
    c.model.embed_dim, c.model.width, c.model.num_layers = 32, 128, 2
    c.model.num_heads, c.model.mlp_dim, c.model.dtype = 4, 512, "float32"
    c.train.steps, c.train.batch_size, c.train.warmup_steps = 200, 16, 20
    c.train.eval_every = c.train.checkpoint_every = c.train.sample_every = 100
    c.train.eval_batches, c.sample.steps = 4, 32
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of experiments/large.py; use '' or 'cpu'")
  return c
