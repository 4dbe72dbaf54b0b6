"""Models: validation of config.model and construction.

`build_model` creates the parameters unplaced (default device, no eager sharding); to create a
model already sharded over a mesh use `hyperconn_jax.sharding.create_model`.
"""

from flax import nnx

from hyperconn_jax import connections
from hyperconn_jax.models import decoder

MODEL_NAMES = ('decoder_lm',)
NORMS = ('layernorm', 'rmsnorm')
DTYPES = ('float32', 'bfloat16')

_POSITIVE_INTS = ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'head_dim', 'mlp_dim')
_POSITIVE_FLOATS = ('norm_eps', 'rope_theta', 'init_std')
_BOOLS = ('qk_norm', 'tie_embeddings', 'scan_layers')


def _check(ok: bool, field: str, value, allowed: str) -> None:
  if not ok:
    raise ValueError(f'model.{field} must be {allowed}, got {value!r}')


def validate(config) -> None:
  """Raises ValueError naming the field (e.g. 'model.d_model'), the value and what is allowed.

  Args:
    config: config.model.
  """
  _check(config.name in MODEL_NAMES, 'name', config.name, f'one of {MODEL_NAMES}')
  for field in _POSITIVE_INTS:
    value = config[field]
    _check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
           field, value, 'a positive integer')
  for field in _POSITIVE_FLOATS:
    value = config[field]
    _check(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
           field, value, 'a positive number')
  for field in _BOOLS:
    _check(isinstance(config[field], bool), field, config[field], 'True or False')
  # RoPE rotates pairs of channels.
  _check(config.head_dim % 2 == 0, 'head_dim', config.head_dim, 'even (RoPE)')
  _check(config.norm in NORMS, 'norm', config.norm, f'one of {NORMS}')
  _check(config.dtype in DTYPES, 'dtype', config.dtype, f'one of {DTYPES}')
  _check(config.param_dtype in DTYPES, 'param_dtype', config.param_dtype, f'one of {DTYPES}')
  _check(config.remat_policy in decoder.REMAT_POLICIES, 'remat_policy', config.remat_policy,
         f'one of {decoder.REMAT_POLICIES}')
  connections.validate(config.connection, config.d_model)


def build_model(config, rngs: nnx.Rngs) -> decoder.DecoderLM:
  """Validates config.model and returns the model with freshly initialised, unplaced parameters."""
  validate(config)
  with nnx.use_eager_sharding(False):
    return decoder.DecoderLM(config, rngs=rngs)
