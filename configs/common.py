"""Shared config snippets (functions, not copies): the base trainer config and arg parsing."""
import ml_collections


def parse_arg(arg, **defaults):
  """Parses 'a=1,b,c=x' (from `--config file.py:a=1,b`) into a ConfigDict over `defaults`.

  A bare name sets a boolean default to True. Unknown names are an error, so a typo
  in the command line does not silently run the default experiment.
  """
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; valid: {sorted(defaults)}")
    default = defaults[key]
    if not value:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      result[key] = True
    elif isinstance(default, bool):
      result[key] = value.lower() in ("1", "true", "yes")
    else:
      result[key] = type(default)(value)
  return result


def base_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with neutral defaults; experiments override them."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 32            # global batch, split over all devices of all processes
  c.num_train_steps = 1000
  c.log_every_steps = 50
  c.eval_every_steps = 1000    # also evaluated at the end
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.resume = ""                # a workdir or checkpoint directory to continue from
  c.init_from = ""             # pretrained weights (a local Hugging Face directory)
  c.distributed = False        # call jax.distributed.initialize() (multi-host)

  c.data = ml_collections.ConfigDict()
  c.data.name = "css"
  c.data.data_dir = "data_cache"   # TFDS data_dir (generated CSS lives here)
  c.data.manual_dir = ""           # real datasets: the user's download
  c.data.image_size = 64
  c.data.num_scenes = 1000
  c.data.num_queries = 16000
  c.data.dataset_seed = 0
  c.data.query_render = "3d"       # CSS: '3d' (3D->3D) or '2d' (2D->3D)
  c.data.target_render = "3d"
  c.data.max_text_len = 16
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.eval_max_queries = 0      # 0 = every query (the protocol); >0 only for smoke runs

  c.model = ml_collections.ConfigDict()
  c.model.image_encoder = "resnet18"
  c.model.text_encoder = "lstm"
  c.model.composer = "tirg"
  c.model.composer_kwargs = ml_collections.ConfigDict()
  c.model.embed_dim = 512
  c.model.word_dim = 512
  c.model.text_hidden_dim = 512
  c.model.separate_query_encoder = False
  c.model.init_scale = 4.0
  c.model.dtype = "float32"

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "soft_triplet"     # soft_triplet (K=2, Eq. 5) | batch_classification (K=B, Eq. 6)
  c.loss.kernel = "neg_sq_l2"
  c.loss.negatives = "global"      # 'global': all devices' targets; 'local': this device's only

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.01
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-6
  c.optimizer.warmup_steps = 0
  c.optimizer.decay_steps = ()     # step boundaries where the rate is multiplied by decay_factor
  c.optimizer.decay_factor = 0.1
  c.optimizer.grad_clip_norm = 0.0  # 0 = off

  c.eval = ml_collections.ConfigDict()
  c.eval.ks = (1, 5, 10, 50)
  c.eval.batch_size = 256
  c.eval.block_size = 1024
  return c
