"""GLUE fine-tuning of a pre-trained discriminator (or any HF DebertaV2 checkpoint).

  python -m deberta_jax.finetune --config=configs/finetune.py --config.task=sst2 \
      --config.init=PRETRAIN_WORKDIR_OR_HF_DIR --config.glue_dir=/data/glue --workdir=OUT

Defaults are the paper's Table 11 (DeBERTaV3-base column); the paper tuned each task over

  | hyper-parameter          | Table 11 search space (base)      | default here            |
  | ------------------------ | --------------------------------- | ----------------------- |
  | dropout of the task layer| {0, 0.1, 0.15}                    | cls_dropout = 0.1       |
  | warmup steps             | {50, 100, 500, 1000}              | 10% of the steps        |
  | learning rate            | {1.5e-5, 2e-5, 2.5e-5, 3e-5}      | 2e-5                    |
  | batch size               | {16, 32, 48, 64}                  | 32                      |
  | weight decay             | 0.01                              | 0.01                    |
  | maximum training epochs  | 10                                | 10 (best dev epoch kept)|
  | learning-rate decay      | linear                            | linear to 0             |
  | Adam eps / b1 / b2       | 1e-6 / 0.9 / 0.999                | same                    |
  | gradient clipping        | 1.0                               | 1.0                     |

(large: lr {5e-6, 8e-6, 9e-6, 1e-5}, batch {16, 32, 64}, dropout {0, 0.15, 0.3}; small:
lr {1.5e-5, 2e-5, 3e-5, 4e-5}.) The paper selects the model on each task's dev set; here the dev set
is scored after every epoch and results.json keeps every epoch and the best one. Warmup is a
proportion because the number of steps depends on the task's size; `warmup_steps` > 0 sets a count
as in Table 11. Models pre-trained from scratch at small scale (the GDES study) need a much larger
learning rate (1e-4 .. 1e-3) than these defaults, which are for a fully pre-trained base model.
Compare a pre-trained init with a random one at more than one rate: pre-training leaves the
weights several times larger than the init's 0.02 (configs/mini.py: 0.07-0.16), and Adam moves
each by about the rate per step, so the same rate moves the pre-trained network less. With 2k
SST-2 examples mini's discriminator is behind a random init at 1e-3 and ahead at 2e-3
(docs/benchmarks.md, "The fine-tuning rate").
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.task = "sst2"               # cola sst2 mrpc qqp stsb mnli qnli rte wnli
  # A pre-training workdir (its discriminator; under GDES the embedding E_G + E_delta; its
  # spm.model) or a Hugging Face DebertaV2 directory (config.json, model.safetensors or
  # pytorch_model.bin, spm.model).
  c.init = ""
  # Checkpoint step of a pre-training workdir; -1 = the newest; 0 = the random init its run
  # started from (recomputed from its config: the no-pre-training control, same tokenizer).
  c.init_step = -1
  c.glue_dir = ""               # directory of GLUE TSV files (GLUE_DIR/SST-2/train.tsv ...);
  c.tfds_data_dir = ""          # '' glue_dir: read tfds glue/<task> (array_record) from here
  c.max_seq_length = 128
  c.max_train_examples = 0      # > 0: only the first N training examples (quick runs)
  c.max_eval_examples = 0       # > 0: only the first N examples of each dev split

  c.seed = 0
  c.batch_size = 32             # global batch, split over the mesh's data axes
  c.eval_batch_size = 128
  c.num_epochs = 10
  c.learning_rate = 2e-5
  c.warmup_proportion = 0.1
  c.warmup_steps = 0            # > 0 overrides warmup_proportion
  c.weight_decay = 0.01
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-6
  c.clip_norm = 1.0
  c.cls_dropout = 0.1           # Table 11 "dropout of task layer" (before the classifier)
  # 'cls' (the reference's ContextPooler on [CLS]) or 'mean' (over the real tokens, then the same
  # dense + gelu); 'mean' cannot be exported as a transformers model (export_best=False).
  c.pooling = "cls"
  c.reinit_top_layers = 0       # > 0: the top N encoder layers start from a fresh init
  c.layer_lr_decay = 1.0        # < 1: layer i of L trains at lr * decay^(L - i), embeddings lowest
  c.head_lr_scale = 1.0         # the pooler and classifier train at lr * this
  c.pooler_dropout = 0.0        # before the pooler's dense (0 in the released HF configs)
  c.backbone_dropout = -1.0     # hidden/attention dropout of the encoder; < 0 keeps the model's
  c.model_dtype = "float32"     # compute dtype ('bfloat16' on GPU/TPU); parameters stay float32
  c.attention_impl = ""         # '' keeps the model's; 'gather' | 'skew' | 'flash'

  c.log_every_steps = 50
  c.eval_every_epochs = 1
  c.export_best = True          # write OUT/best_model as a HF DebertaV2ForSequenceClassification

  c.mesh = ml_collections.ConfigDict()
  c.mesh.num_devices = 0        # 0 = every device
  c.mesh.data = -1              # fine-tuning models are small: pure data parallelism by default
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  return c
