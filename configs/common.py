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
  # Several seeds in one program (cir_jax/seeds.py): S > 1 trains S independent replicas
  # (seeds seed, seed+1, ...: init, dropout, data order) in one vmapped step and reports
  # mean +- std of every metric. Not combinable with init_from yet.
  c.num_seeds = 1
  c.batch_size = 32            # global batch, split over all devices of all processes
  c.num_train_steps = 1000
  c.log_every_steps = 50
  c.eval_every_steps = 1000    # also evaluated at the end
  c.checkpoint_every_steps = 500
  # Train steps per compiled call (a lax.scan of the same steps; cir_jax/train.py). K > 1 saves
  # XLA:CPU's per-execution buffer mapping; keep log/checkpoint/eval intervals multiples of K
  # (steps in a block that such a step falls inside run one per call).
  c.steps_per_call = 1
  c.keep_checkpoints = 3
  c.preemption_sync_every_steps = 10  # multi-process: steps between agreeing to stop on SIGTERM
  # Stop a run that diverges while staying finite, before it saves (cir_jax/divergence.py):
  # on logging and save steps, loss > loss_factor * max(median of the last `window` checked
  # losses, loss_floor), or param_norm > param_norm_factor * their median, once `min_history`
  # steps were checked. The rotation also keeps the checkpoint of lowest median loss.
  c.divergence = ml_collections.ConfigDict()
  c.divergence.enabled = True      # False: never stop (the history is still kept)
  c.divergence.window = 20
  c.divergence.min_history = 5
  c.divergence.loss_factor = 10.0
  c.divergence.loss_floor = 0.5    # so a loss near 0 may rise to loss_factor * loss_floor (5)
  c.divergence.param_norm_factor = 10.0
  c.resume = ""                # a workdir or checkpoint directory to continue from
  c.init_from = ""             # pretrained weights (a local Hugging Face directory)
  c.init_from_image = ""       # per-tower overrides of init_from (e.g. CIRPLANT: ResNet + BERT)
  c.init_from_text = ""
  c.distributed = False        # call jax.distributed.initialize() (multi-host)
  c.distributed_coordinator = ""  # process 0 "host:port"; "" = env JAX_COORDINATOR_ADDRESS / auto
  c.num_processes = 0          # 0 = env JAX_NUM_PROCESSES or auto-detect (TPU, SLURM, ...)
  c.process_id = -1            # -1 = env JAX_PROCESS_ID or auto-detect

  c.data = ml_collections.ConfigDict()
  c.data.name = "css"
  c.data.data_dir = "data_cache"   # TFDS data_dir: generated CSS, prepared manual-dataset tables
  c.data.manual_dir = ""           # real datasets: the user's download
  c.data.image_size = 64
  # Files -> S x S pixels (cir_jax/data/preprocess.py); CSS's in-memory renders are used as
  # they are. 'resize_center_crop' = google/tirg (Resize(S) + CenterCrop(S)); the CLIP
  # configs set 'clip' (SSN) or 'targetpad' (CLIP4Cir); 'squash' = aspect ratio ignored.
  c.data.preprocess = "resize_center_crop"
  c.data.target_pad_ratio = 1.25   # 'targetpad': CLIP4Cir's TargetPad ratio
  c.data.num_scenes = 1000
  c.data.num_queries = 16000
  c.data.dataset_seed = 0
  c.data.query_render = "3d"       # CSS: '3d' (3D->3D) or '2d' (2D->3D)
  c.data.target_render = "3d"
  c.data.css_source = "tfds"       # CSS: 'tfds' (generated once into data_dir) | 'numpy' (in
                                   # memory each run, no TensorFlow; tools/device_check.py)
  c.data.max_text_len = 16
  # Where training batches come from (cir_jax/data/device_data.py): 'host' (tf.data),
  # 'device' (the split's uint8 images on every device, each batch gathered inside the
  # jitted step in the same order; in-memory tables only, e.g. CSS) or 'auto' (device
  # when the split is in memory and its images fit device_memory_fraction of one device).
  c.data.placement = "host"
  c.data.device_memory_fraction = 0.25
  # Frozen towers (cir_jax/feature_cache.py): 'auto' runs a tower frozen from step 0 once per
  # training image (and text) and trains from its cached features when that is exact; 'on'
  # errors when the frozen image tower cannot be cached; 'off' always runs the towers.
  c.data.cache_frozen_features = "auto"
  c.data.tokenizer = "vocab"       # 'vocab' (word vocabulary, LSTM) | a local HF tokenizer dir
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.eval_max_queries = 0      # 0 = every query (the protocol); >0 only for smoke runs
  # Manual-download datasets (cir_jax/data/{cirr,fashioniq,fashion200k,mit_states}.py).
  c.data.skip_missing_images = False  # False: error listing missing images; True: drop + count
  c.data.category = "dress"        # FashionIQ category evaluated (its own val gallery)
  c.data.train_categories = ("dress", "shirt", "toptee")  # FashionIQ categories trained on
  c.data.caption_join = "and"      # FashionIQ: 'and' ("<C1> and <c2>") | 'random_forms' (train)
  c.data.image_extensions = ("png", "jpg")  # FashionIQ image suffixes tried in order
  c.data.pairs_per_image = 1       # Fashion200k / MIT-States training pairs drawn per image
  c.data.mit_states_split = "tirg"  # 'tirg' (49 held-out nouns) | 'compositional' (pair split)

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
  c.model.learn_scale = True       # False: fixed scale init_scale (CLIP methods: the loss temperature scales)
  c.model.frozen_image_encoder = False  # pretrained image tower as a fixed extractor (BN eval, no grad)
  c.model.frozen_text_encoder = False
  c.model.dtype = "float32"
  c.model.conv_impl = "auto"       # ResNet convs: 'auto' (CPU <= 128 px: per-layer 'mixed'; native elsewhere) | 'xla' | 'matmul' | 'mixed'

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "soft_triplet"     # soft_triplet (K=2, Eq. 5) | batch_classification (K=B, Eq. 6)
  #                                  | general_k (Eq. 4) | batch_hard_triplet
  c.loss.kernel = "neg_sq_l2"
  c.loss.negatives = "global"      # 'global': all devices' targets; 'local': this device's only
  c.loss.k = 2                     # general_k (Eq. 4): set size K (one positive + K-1 negatives)
  c.loss.m = 0                     # general_k: sets per query M; 0 = every C(n-1, K-1) set
  c.loss.margin = 0.2              # batch_hard_triplet: margin on distances of scaled embeddings
  c.loss.temperature = 0.01        # temperature_ce / ssn: tau (0.01 = CLIP's logit scale 100)
  c.loss.kl_weight = 1.0           # ssn: lambda of Eq. 9 (configs/ssn_cirr.py uses 1/batch)
  c.loss.set_negatives = 0         # soft_triplet: S CIRR image-set members per query as
                                   # extra negatives, our extension (not CIRPLANT's); 0 = off

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.01
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-6
  c.optimizer.warmup_steps = 0
  c.optimizer.decay_steps = ()     # step boundaries where the rate is multiplied by decay_factor
  c.optimizer.decay_factor = 0.1
  c.optimizer.grad_clip_norm = 0.0  # 0 = off
  c.optimizer.schedule = "step"    # 'step' (decay_steps) | 'linear' (to 0 at total_steps)
  c.optimizer.total_steps = 0      # 'linear' schedule length
  c.optimizer.freeze = ()          # regexes over param paths never updated, e.g. ('^image_encoder/',)
  c.optimizer.lr_multipliers = ()  # ((regex, factor), ...): per-group learning rates
  c.optimizer.freeze_after = ()    # regexes fixed from step freeze_after_steps on
  c.optimizer.freeze_after_steps = 0

  c.eval = ml_collections.ConfigDict()
  c.eval.ks = (1, 5, 10, 50)
  c.eval.batch_size = 256
  c.eval.block_size = 1024
  # 'exclude_ref' (reference removed from its ranking) | 'include_ref'; the first is the
  # headline, the others are reported as '<variant>/R@K'.
  c.eval.gallery_variants = ("exclude_ref",)
  return c


# Training-set sizes used to turn the papers' epochs into steps (triplets per epoch).
CIRR_TRAIN_TRIPLETS = 28_225  # cap.rc2.train.json
FASHIONIQ_TRAIN_TRIPLETS = 18_000  # dress 5985 + shirt 5988 + toptee 6027 (cap.*.train.json)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches in one pass over `num_examples` (PyTorch drop_last=True)."""
  return max(1, num_examples // batch_size)


def use_tiny_encoders(c, image_encoder: str, text_encoder: str, width: int = 32):
  """Shrinks a pretrained-encoder config for tests: tiny towers, 32 px, batch 8, word vocab."""
  c.model.image_encoder = image_encoder
  c.model.text_encoder = text_encoder
  c.model.embed_dim = width
  c.data.image_size = 32
  c.data.max_text_len = 16
  c.data.tokenizer = "vocab"   # tiny towers have 99 ids; the word vocabulary of tests fits
  c.init_from = c.init_from_image = c.init_from_text = ""
  c.batch_size = 8
  c.num_train_steps = 1
  c.eval_every_steps = c.checkpoint_every_steps = c.log_every_steps = 1
  c.eval.batch_size = 16
  c.eval.block_size = 8
  c.optimizer.decay_steps = ()
  c.optimizer.freeze_after_steps = min(c.optimizer.freeze_after_steps, 1)
  return c


def cirr_pretrained_data(c, tokenizer: str, max_text_len: int):
  """CIRR at 224 px (train on train, evaluate val) tokenised by a checkpoint's tokenizer.

  `tokenizer` is the checkpoint directory holding the tokenizer files; '' falls
  back to the word vocabulary (only meaningful for the tiny test towers).
  """
  c.data.name = "cirr"
  c.data.image_size = 224
  c.data.train_split = "train"
  c.data.eval_split = "val"
  c.data.max_text_len = max_text_len
  c.data.tokenizer = tokenizer or "vocab"
  c.eval.ks = (1, 5, 10, 50)
  return c


# The TIRG family's image encoder (google/tirg img_text_composition_models.py + main.py).
TIRG_TRUNK = r"^(query_)?image_encoder/"   # the ResNet trunk; its fc is our target/query_proj


def tirg_resnet18(c, real_images: bool):
  """ResNet-18 trunk, loadable by init_from; on real-image datasets google/tirg's
  learning-rate groups (main.py): the trunk at 0.1x, its fc and the rest at 1x."""
  c.model.image_encoder = "resnet18"
  c.init_from = ""   # the user's ResNet-18 directory; empty = from scratch (a deviation)
  c.optimizer.lr_multipliers = ((TIRG_TRUNK, 0.1),) if real_images else ()
  return c
