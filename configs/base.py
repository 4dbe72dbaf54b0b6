"""Every default of hyperconn_jax lives here.

Other config files import `get_config()` from this module and override a few fields; library
code reads `config.x` and never supplies a default of its own. Sequences are tuples (ml_collections
cannot override lists from the command line).

Not meant to be run directly; see configs/default.py and configs/lm.py.
"""

import ml_collections

from hyperconn_jax import connections


def connection_config() -> ml_collections.ConfigDict:
  """Options of the residual / hyper-connection wrapping every sub-layer (config.model.connection).

  `kind` picks the connection; every registered kind has its own sub-config holding only its
  options, with the defaults its module declares (`defaults()` in hyperconn_jax/connections/):
    kind='hc'               (default) residual_prenorm | residual_postnorm | hc | mhc | frac |
                            resi_dual | altup | vwn, or any kind registered with
                            hyperconn_jax.connections.register
    hc.n=4, hc.dynamic=True, hc.tanh=True, hc.dynamic_norm='layernorm', hc.scale=True, ...
                            Hyper-Connections (hc.py)
    mhc.n=4, mhc.sinkhorn_iters=20, mhc.pre_init='home', mhc.mappings, mhc.reduce='sum', ...
                            mHC (mhc.py)
    frac.m=4, frac.dynamic=True, ...   Frac-Connections (frac.py)
    altup.n=4, altup.index_base=0      AltUp (altup.py)
    vwn.m=2, vwn.n=4, vwn.dynamic=True, vwn.reduce_norm='group', vwn.reduce_init='cyclic'
                            Virtual Width Networks (vwn.py)
    residual_prenorm, residual_postnorm, resi_dual: no options
  Options of every kind can be set on the command line whatever the kind, e.g.
  --config.model.connection.kind=mhc --config.model.connection.mhc.sinkhorn_iters=10.
  """
  return connections.defaults()


def moe_config() -> ml_collections.ConfigDict:
  """Mixture-of-experts FFN in the OLMoE style (config.model.moe; used when model.ffn='moe')."""
  return ml_collections.ConfigDict(dict(
      # Routed experts (each a SwiGLU MLP of hidden size model.mlp_dim) and experts per token.
      num_experts=8,
      top_k=2,
      # Renormalise the top-k router probabilities to sum to 1 (OLMoE: False, the raw softmax).
      renormalize=False,
      # 0: dropless (tokens sorted by expert, grouped matmuls: every assignment is computed);
      # > 0: each expert takes at most ceil(capacity_factor * tokens * top_k / num_experts)
      # assignments of a batch, the rest are dropped (their weight is lost; the residual remains).
      capacity_factor=0.0,
      # Weights of the auxiliary losses in the training objective (OLMoE: 0.01 and 0.001).
      # load_balance: E * sum_e f_e * P_e (f_e: fraction of assignments to e, P_e: mean router
      # probability of e; 1 when balanced); router_z: mean logsumexp(router logits)^2.
      load_balance_weight=0.01,
      router_z_weight=0.001,
  ))


def vit_config() -> ml_collections.ConfigDict:
  """Vision Transformer classifier (config.model.vit; used when model.name='vit')."""
  return ml_collections.ConfigDict(dict(
      # Square input images of image_size x image_size x channels, cut into patch_size patches.
      image_size=8,
      patch_size=2,
      channels=1,
      num_classes=10,
      # 'token' (a learned class token, as the original ViT) | 'gap' (mean over the patches).
      pool='gap',
      # Dropout rate after the patch embedding and on every sub-layer's output (HC Table 12:
      # 0.1); applied in training only.
      dropout=0.0,
  ))


def model_config() -> ml_collections.ConfigDict:
  """Decoder-only LM in the OLMo style (config.model)."""
  return ml_collections.ConfigDict(dict(
      name='decoder_lm',
      vocab_size=256,
      d_model=256,
      num_layers=4,
      num_heads=4,
      head_dim=64,
      mlp_dim=1024,
      # 'layernorm' (no affine, as OLMo) | 'rmsnorm' (learnable scale).
      norm='layernorm',
      norm_eps=1e-5,
      qk_norm=False,
      tie_embeddings=True,
      rope_theta=10000.0,
      # Weight init: 'normal' (std init_std) | 'mitchell' (OLMo: truncated normal of std
      # 1/sqrt(fan-in), output projections of block l divided by sqrt(2 (l + 1))).
      init='normal',
      init_std=0.02,
      # Compute dtype ('float32' | 'bfloat16'); parameters are always kept in param_dtype
      # (float32 master weights under bfloat16 compute).
      dtype='float32',
      param_dtype='float32',
      # dtype of the residual streams between sub-layers ('float32' | 'bfloat16'); float32 under
      # bfloat16 compute is OLMo's autocast (branches compute in dtype, the residual adds in fp32).
      stream_dtype='float32',
      # Attention implementation (hyperconn_jax/models/attention.py): 'auto' (splash on TPU for
      # lengths that are multiples of 128, cudnn on GPU with bfloat16; on CPU rows up to the
      # smaller chunked block; chunked otherwise) | 'xla' (dense [L, L] scores) | 'rows' (dense by
      # query blocks, skipping the masked ones) | 'chunked' (blockwise online softmax, memory
      # linear in L) | 'cudnn' | 'splash'.
      attention='auto',
      # 'chunked' tile sizes (need not divide the sequence length).
      attention_block_q=512,
      attention_block_kv=512,
      # 'rows' query block (64: fastest on CPU at L = 256-512; need not divide L).
      attention_block_rows=64,
      # Stack blocks with nnx.vmap + nnx.scan (False: a Python loop, for debugging).
      scan_layers=True,
      # Layers per iteration of that scan (jax.lax.scan's unroll): 0 (auto) = all of them on CPU
      # for models of up to 8 layers without remat, where the scan's stacked per-layer buffers
      # (zero-filled, then written and read by dynamic slices) cost ~20% of a small model's step,
      # else 1 (compile time flat in depth; remat keeps its memory saving); k >= 1: k layers per
      # iteration.
      scan_unroll=0,
      # Rematerialisation of each block: 'none' | 'full' | 'dots' | 'dots_no_batch' |
      # 'save_streams' (keep the stream state, recompute the rest) | 'offload_streams' (the stream
      # state goes to host memory between forward and backward; the rest is recomputed).
      remat_policy='none',
      # Feed-forward sub-layer: 'dense' (model.mlp_activation MLP) | 'moe' (config.model.moe).
      ffn='dense',
      # Dense MLP: 'swiglu' (OLMo: down(silu(gate(y)) * up(y))) | 'gelu' (ViT: down(gelu(up(y)))).
      mlp_activation='swiglu',
      # Give the model's LayerNorms a learned scale (ViT; RMSNorm always has one). No biases.
      norm_affine=False,
      connection=connection_config(),
      moe=moe_config(),
      vit=vit_config(),
  ))


def get_config() -> ml_collections.ConfigDict:
  """Returns the full default config (unlocked; callers lock it)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config()

  c.data = ml_collections.ConfigDict(dict(
      # 'stdlib' (embedded corpus: the running interpreter's standard library sources) |
      # 'text_files' (data.text_glob) | 'tokens' (token shards written by
      # `python prepare.py`, at data.data_dir) | any prepared TFDS dataset name
      # ('lm1b', 'c4', ...).
      dataset='stdlib',
      # Where TFDS datasets are prepared / found ('' -> ~/tensorflow_datasets); for 'tokens' the
      # shards' directory. Any etils.epath path (gs://... too).
      data_dir='',
      # For 'text_files': a glob of paths to text files.
      text_glob='',
      # Feature holding the text in the TFDS examples.
      text_key='text',
      train_split='train',
      eval_split='validation',
      # 'bytes' | 'sentencepiece' | 'huggingface' (HF `tokenizers` file, e.g. GPT-NeoX-20B's
      # tokenizer.json), with its model file in tokenizer_path (any etils.epath path). 'tokens'
      # shards must have been made with the same tokenizer.
      tokenizer='bytes',
      tokenizer_path='',
      seq_len=256,
      # 'stdlib' / 'text_files' / prepare: fraction of the documents (by a stable hash of each
      # document's key) in validation.
      eval_fraction=0.03,
      # 'text_files' / prepare from text: a document longer than this many characters is cut, after
      # line breaks, into pieces of at most this size, each a document of its own (for the split
      # too, so one huge file still gives a validation split); 0: never cut.
      piece_chars=16384,
      # Training stops before compiling when the eval split has fewer tokens than this (a tiny
      # split gives evaluations that look normal and mean nothing). 0: one global batch,
      # train.batch_size * data.seq_len.
      min_eval_tokens=0,
      shuffle_seed=0,
      # Train only: packed sequences are also shuffled within windows of this many sequences, so a
      # batch mixes several documents (long files give many consecutive sequences); <= 1: off.
      # (grain's index shuffle costs milliseconds per sequence for windows below ~100.)
      shuffle_window=1024,
      # Threads per process that read (and, for text, tokenize) documents ahead of the packer.
      read_threads=8,
      # Grain worker processes (0: read in the main process).
      worker_count=0,
      # Train: the documents are split into this many shards (contiguous ranges), each read by one
      # process and packed and shuffled on its own; a global batch takes
      # train.batch_size / num_shards rows from each shard in shard order. 0: one shard per process
      # (the batches then depend on the process count). A fixed value (a multiple of every process
      # count used) gives the same batches, so the same run, on any number of processes; e.g. 2 on
      # one process equals 2 x 1 on two, and (with worker_count=0) a run may resume on another
      # process count dividing it.
      num_shards=0,
      # Image classification (model.name='vit'): data.dataset is 'digits' (embedded: scikit-learn's
      # 8x8 handwritten digits, no download) or a prepared TFDS image dataset ('cifar10',
      # 'imagenet2012', ...) with these features.
      image_key='image',
      label_key='label',
      # Training augmentation: random crop (images of model.vit.image_size: pad by crop_padding
      # pixels (reflect) and crop back; other sizes: random resized crop of at least
      # crop_min_area of the image), horizontal flip, and mixup with Beta(alpha, alpha) (0: off).
      crop_padding=1,
      crop_min_area=0.08,
      random_flip=False,
      mixup_alpha=0.0,
  ))

  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-4,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      # Weight decay on embeddings (norm scales, biases and static HC parameters are never decayed;
      # dynamic HC weights are).
      decay_embeddings=False,
      # 'cosine' (linear warmup, cosine to lr * final_lr_frac) | 'constant' (after warmup) |
      # 'step' (mHC paper: multiply by step_factors at step_fracs of the run).
      schedule='cosine',
      warmup_steps=100,
      final_lr_frac=0.1,
      step_fracs=(0.8, 0.9),
      step_factors=(0.316, 0.1),
      grad_clip=1.0,
      # dtype of the Adam moments between steps ('float32' | 'bfloat16': half the optimizer
      # memory; the update is computed in float32 either way).
      moment_dtype='float32',
      grad_accum_steps=1,
      z_loss=0.0,
  ))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=32,
      num_steps=1000,
      log_every=10,
      eval_every=200,
      eval_batches=20,
      # Global rows of each eval batch (eval_batches counts these); 0: the training microbatch,
      # train.batch_size / optim.grad_accum_steps.
      eval_batch_size=0,
      checkpoint_every=200,
      # Persistent XLA compilation cache (a directory or gs:// URL, shared by runs and restarts:
      # a resumed or repeated run skips compiling); '' is off.
      compilation_cache_dir='',
      # How this process's glibc malloc serves XLA:CPU's buffers (hyperconn_jax/host_malloc.py):
      # 'reuse' keeps freed memory in one heap for the next step instead of page-faulting fresh
      # zeroed pages for every step's temporaries (~20% of a small CPU step); 'system' leaves
      # malloc alone; 'auto' is 'reuse' where JAX computes on the CPU (no TPU / GPU device files).
      host_malloc='auto',
      # Profiler window: updates profile_start_step + 1 .. profile_start_step + profile_num_steps
      # are traced on process 0 to WORKDIR/profile (TensorBoard's profile plugin / XProf);
      # profile_num_steps=0 is off.
      profile_start_step=10,
      profile_num_steps=0,
  ))

  c.checkpoint = ml_collections.ConfigDict(dict(
      # Retention: the latest keep_latest steps, the keep_best steps with the lowest eval_loss
      # and, if keep_every > 0, every step that is a multiple of keep_every (a multiple of
      # train.checkpoint_every).
      keep_latest=2,
      keep_best=1,
      keep_every=0,
      async_save=True,
  ))

  c.mesh = ml_collections.ConfigDict(dict(
      # Sizes of the mesh axes; one may be -1 (filled with the remaining devices).
      shape=(1, -1, 1),
      axes=('data', 'fsdp', 'tensor'),
      # Logical axis name -> mesh axes (None: replicated).
      rules=(
          ('batch', ('data', 'fsdp')),
          # Sequence sharding for long contexts: map 'length' to a mesh axis (e.g. add a
          # 'sequence' axis to mesh.axes); the activations (token batches, streams, logits) are
          # then split along the sequence (tests/test_sharding.py::test_sequence_sharding_*).
          ('length', None),
          ('embed', 'fsdp'),
          ('mlp', 'tensor'),
          ('heads', 'tensor'),
          ('kv', None),
          ('vocab', 'tensor'),
          ('layers', None),
          ('streams', None),
          ('hc', None),
          # MoE experts: expert parallelism over the data-parallel devices (GShard style; when
          # they divide the experts). Not 'fsdp': 'embed' already maps there, and one weight
          # cannot use a mesh axis twice.
          ('expert', 'data'),
      ),
  ))
  return c
