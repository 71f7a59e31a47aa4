"""Defaults shared by every pre-training config; size files change only what differs.

Every field is a scalar so that any of them can be overridden on the command line, e.g.
`--config.optim.learning_rate=1e-4 --config.mesh.fsdp=8`. Values derived from others (padded
vocabulary, generator depth, per-device batch) are computed in `deberta_jax.config`, never
stored here.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                             # parameter init, masking, sampling and dropout
  c.num_train_steps = 500_000            # optimizer updates (paper Table 10)
  c.global_batch_size = 8192             # sequences per update, over all devices and micro-batches
  c.seq_len = 512                        # tokens per sequence, [CLS] and [SEP] included
  # Compile the training step for the configured mesh, print per-device memory and FLOPs, and
  # exit without training or writing anything.
  c.dry_run = False
  # Dry run only: plan for this many devices even if fewer are present (simulated as CPU devices;
  # memory is XLA's CPU buffer assignment, an estimate of what a TPU/GPU compile would need).
  c.dry_run_devices = 0
  # Persistent XLA compilation cache: a restarted run (preemption, requeue) loads the compiled
  # step instead of compiling it again. 'auto' = <data.cache_dir or ~/.cache/deberta_jax>/xla,
  # '' = off, or any local or gs:// directory.
  c.compilation_cache_dir = "auto"
  # Stop after this many steps of this invocation (0 = run to num_train_steps); for smoke runs.
  c.stop_after_steps = 0
  # A step whose loss or gradient norm is NaN/inf: 'stop' names the step and exits (the last
  # checkpoint is kept, nothing after the bad step is saved); 'skip' drops that update, counts it,
  # and goes on, until more than `nonfinite_max_skips` steps have been skipped in this invocation.
  c.nonfinite = "stop"
  c.nonfinite_max_skips = 20             # with nonfinite='skip': stop after this many skipped steps

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 128100          # embedding rows: 128000 spm pieces + [MASK] + 99 spare
  c.model.hidden_size = 768              # width H of both networks
  c.model.num_layers = 12              # discriminator depth
  c.model.generator_num_layers = 0     # 0 = half the discriminator depth (the paper's choice)
  c.model.num_heads = 12                 # attention heads; H / heads is the head size
  c.model.intermediate_size = 3072       # FFN width
  c.model.max_position_embeddings = 512  # absolute positions (the EMD table); seq_len <= this
  c.model.position_buckets = 256         # relative-position log buckets k (2k table rows)
  c.model.max_relative_positions = -1    # -1 = the bucket count decides the clamp distance
  c.model.layer_norm_eps = 1e-7          # LayerNorm epsilon of the official models
  c.model.hidden_dropout = 0.1           # embedding, attention-output and FFN-output dropout
  c.model.attention_dropout = 0.1        # dropout on attention probabilities
  c.model.initializer_range = 0.02       # std of the N(0, s) initialisation
  c.model.vocab_pad_multiple = 128       # pad embedding rows to a multiple (even sharding)
  c.model.dtype = "bfloat16"           # compute dtype; parameters and losses stay float32
  c.model.attention_impl = "skew"      # 'skew' (relative shift), 'gather' (reference indexing)
                                       # or 'flash' (fused Pallas kernels, GPU and TPU)
  c.model.flash_block = 64             # 'flash' tile: query/key rows per tile (power of two)
  c.model.remat = "none"               # 'none' | 'full' | 'dots'
  c.model.scan_layers = False          # True: the layers as one lax.scan (compiles once)
  c.model.embedding_sharing = "gdes"   # 'gdes' | 'es' | 'nes'

  c.rtd = ml_collections.ConfigDict()
  c.rtd.mask_prob = 0.15               # of non-special tokens, uniformly without replacement
  c.rtd.rtd_lambda = 50.0              # paper/ELECTRA value; the official code uses 10
  c.rtd.temperature = 1.0              # generator sampling temperature
  # 'auto': two updates per step (generator, then discriminator) for nes/gdes, one joint
  # backward of L_MLM + lambda L_RTD for es. 'joint' forces the joint loss for every mode.
  c.rtd.update_mode = "auto"

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 6e-4           # peak rate (both networks unless the next is set)
  c.optim.discriminator_learning_rate = -1.0   # < 0: same as learning_rate
  c.optim.warmup_steps = 10_000          # linear warmup from 0; may exceed the run (a warning)
  c.optim.end_learning_rate = 0.0        # rate at num_train_steps after linear decay
  c.optim.b1 = 0.9                       # Adam beta1
  c.optim.b2 = 0.98                      # Adam beta2
  c.optim.eps = 1e-6                     # Adam epsilon
  c.optim.weight_decay = 0.01            # decoupled (AdamW); not on biases and LayerNorm
  c.optim.clip_norm = 1.0                # global gradient-norm clip per network (0 = off)

  c.data = ml_collections.ConfigDict()
  # Where text comes from: 'embedded' | 'text_files' | 'jsonl' | 'parquet' | 'tfds', prepared
  # into the cache on first use, or 'prepared': a dataset made by `python -m deberta_jax.prepare`.
  # Every path below may be local or gs://.
  c.data.source = "embedded"
  c.data.prepared_dir = ""             # for source='prepared': the prepared dataset
  c.data.text_files = ""               # glob, for source='text_files'
  c.data.split_on_blank_lines = False  # one document per blank-line block instead of per file
  c.data.jsonl_files = ""              # glob of JSON-lines files, for source='jsonl'
  c.data.parquet_files = ""            # glob of Parquet files, for source='parquet'
  c.data.text_field = "text"           # for 'jsonl'/'parquet': the field holding the text
  c.data.tfds_name = ""                # e.g. 'wikipedia/20230601.en', for source='tfds'
  c.data.tfds_split = "train"            # for source='tfds'
  c.data.tfds_text_feature = "text"      # for source='tfds': the feature holding the text
  c.data.tfds_data_dir = ""              # for source='tfds': tfds data_dir ('' = tfds' default)
  c.data.spm_model = ""                # '' = train one on the corpus (cached)
  c.data.spm_vocab_size = 128000         # pieces of the spm model trained when spm_model=''
  c.data.spm_max_sentences = 500_000     # lines sampled (over the whole corpus) to train it
  c.data.cache_dir = ""                # '' = $DEBERTA_JAX_CACHE or ~/.cache/deberta_jax
  c.data.embedded_max_bytes = 8_000_000  # for source='embedded': text taken from the stdlib
  c.data.part_mb = 64.0                  # text per prepared shard (the unit of parallel work)
  c.data.read_threads = 16               # threads reading rows ahead of the step
  c.data.prefetch_batches = 16           # batches read ahead (>= read_threads, or threads idle)
  # The training order shuffles blocks of this many consecutive rows of a shard, then the rows of
  # `shuffle_window_blocks` blocks at a time: the rows a batch takes from one block come in one
  # request (one ranged GET on gs://: 64 rows = 128 KiB of int32 at seq 512) instead of one each,
  # at the price of neighbours in the order sharing a block (docs/data.md measures both).
  # 1 = today's per-row shuffle (and one request per row). A checkpoint keeps its run's values.
  c.data.read_block_rows = 64
  c.data.shuffle_window_blocks = 16
  # Object stores (gs://): the loader's own client keeps at most this many connections, which
  # bounds the requests in flight (rows/s <= connections x rows per request / round trip).
  c.data.read_connections = 100
  # A read that still fails after the client's retries (gcsfs: 31-36 s) is tried again, with
  # backoff and jitter, until this many minutes after its first attempt; then the run stops with
  # a DataError naming the object and byte range. Missing objects and short reads are not retried.
  c.data.read_retry_minutes = 10.0
  # A gs:// cache prepared by several processes together: how long a process that finished its
  # share waits for the others' shards (and the manifest) before it stops, naming what is missing.
  c.data.prepare_wait_minutes = 60.0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.num_devices = 0               # 0 = every device; N = the first N (tests, debugging)
  c.mesh.data = 1                        # data-parallel axis (hosts, nodes); -1 = the rest
  c.mesh.fsdp = -1                     # -1 = the remaining devices
  c.mesh.tensor = 1                      # tensor-parallel axis (heads, FFN, vocabulary)
  # CPU runs only: split the host into this many XLA devices, which the mesh then uses like
  # chips. XLA:CPU runs most ops of a small model on one thread each, so a device per core
  # makes tiny's step 1.2x faster on 2 cores; for models whose step is dominated by
  # parameter-sized work (small: 128k x 768 tables, AdamW) one device is faster (0.7x split).
  # 1 = one device; 0 = one per core, reduced to a count the mesh and global batch divide.
  # Ignored when XLA_FLAGS already sets --xla_force_host_platform_device_count.
  c.mesh.cpu_devices = 1
  # Sequences one device processes per forward/backward; the global batch is reached by
  # gradient accumulation. 0 = automatic: the largest micro-batch whose compiled step fits the
  # per-device memory budget below (the whole per-device share when no budget is known, e.g. CPU).
  c.mesh.per_device_microbatch = 0
  # Per-device memory budget in GiB for the automatic micro-batch; 0 = 90% of what the device
  # reports (TPU/GPU), none on CPU.
  c.mesh.device_memory_gb = 0.0

  # Start from released weights (continued pre-training); '' = random initialisation. Each is a
  # Hugging Face DebertaV2 directory or one state-dict file of the official release
  # (pytorch_model.generator.bin / pytorch_model.bin); ignored when the workdir has a checkpoint.
  c.init = ml_collections.ConfigDict()
  c.init.generator = ""                  # generator weights (with its LM head, if any)
  c.init.discriminator = ""              # discriminator weights (with its RTD head, if any)

  # Held-out evaluation: a fixed slice of the dataset is never trained on; every `every_steps`
  # (and at step 0 of a fresh run, and at the last step) both networks are evaluated on
  # `num_batches` fixed batches of it, dropout off (eval_* in metrics.jsonl, TensorBoard, console).
  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 5000              # 0 = no evaluation and no held-out rows
  # Batches per evaluation; 0 = every whole batch the held-out rows make (their count is known
  # only once the corpus is prepared), which small models want: the effective rank below is
  # measured from a sample covariance, and a few rows per feature dimension bias it low.
  c.eval.num_batches = 10
  c.eval.batch_size = 0                  # sequences per evaluation batch (0 = global_batch_size)
  # Whole shards (parts of the corpus) are held out, never rows of a trained-on shard: at least
  # one, until this fraction of the dataset's rows; evaluation batches wrap around them.
  c.eval.holdout_fraction = 0.001
  # A warning when the discriminator's features collapse: the effective rank of its mean-pooled
  # last layer below this (collapsed tiny runs measured 1.5-2.4, their random init 42-47;
  # 0 = no warning). It comes at every evaluation below it; a rank back above it gets a line
  # saying so, which tells an early dip from a collapse that lasts.
  c.eval.min_effective_rank = 5.0

  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every_steps = 10_000            # permanent checkpoints every N steps (and the last step)
  c.ckpt.keep = 3                        # permanent checkpoints kept (the newest)
  c.ckpt.async_save = True               # write checkpoints in the background
  # Also checkpoint every this many minutes of wall time (0 = off). Such checkpoints, and the one
  # written on preemption, are temporary: each is deleted once a newer checkpoint is complete.
  c.ckpt.every_minutes = 30.0

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 100                # metrics interval (averages since the last)
  return c
