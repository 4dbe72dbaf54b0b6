"""Models: validation of config.model and construction, by config.model.name:
'decoder_lm' (decoder.DecoderLM; an MoE decoder with model.ffn='moe') or 'vit' (vit.ViT).

`build_model` creates the parameters unplaced (default device, no eager sharding); `create_model`
creates them already sharded over a mesh, and `abstract_model` describes them without allocating.
"""

import functools

import jax
from flax import nnx

from hyperconn_jax import connections, sharding
from hyperconn_jax.models import attention
from hyperconn_jax.models import decoder
from hyperconn_jax.models import layers
from hyperconn_jax.models import moe
from hyperconn_jax.models import trunk
from hyperconn_jax.models import vit

MODELS = {'decoder_lm': decoder.DecoderLM, 'vit': vit.ViT}
MODEL_NAMES = tuple(MODELS)
NORMS = ('layernorm', 'rmsnorm')
DTYPES = ('float32', 'bfloat16')
FFNS = ('dense', 'moe')
MLP_ACTIVATIONS = ('swiglu', 'gelu')

_POSITIVE_INTS = ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'head_dim', 'mlp_dim')
_POSITIVE_FLOATS = ('norm_eps', 'rope_theta', 'init_std')
_BOOLS = ('qk_norm', 'tie_embeddings', 'scan_layers', 'norm_affine')


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
  _check(isinstance(config.scan_unroll, int) and not isinstance(config.scan_unroll, bool)
         and config.scan_unroll >= 0, 'scan_unroll', config.scan_unroll,
         'a non-negative integer (0: auto)')
  for field in _BOOLS:
    _check(isinstance(config[field], bool), field, config[field], 'True or False')
  # RoPE rotates pairs of channels.
  _check(config.head_dim % 2 == 0, 'head_dim', config.head_dim, 'even (RoPE)')
  _check(config.norm in NORMS, 'norm', config.norm, f'one of {NORMS}')
  _check(config.dtype in DTYPES, 'dtype', config.dtype, f'one of {DTYPES}')
  _check(config.param_dtype in DTYPES, 'param_dtype', config.param_dtype, f'one of {DTYPES}')
  _check(config.stream_dtype in DTYPES, 'stream_dtype', config.stream_dtype, f'one of {DTYPES}')
  _check(config.init in layers.INITS, 'init', config.init, f'one of {layers.INITS}')
  attention.validate(config)
  _check(config.remat_policy in trunk.REMAT_POLICIES, 'remat_policy', config.remat_policy,
         f'one of {trunk.REMAT_POLICIES}')
  _check(config.ffn in FFNS, 'ffn', config.ffn, f'one of {FFNS}')
  _check(config.mlp_activation in MLP_ACTIVATIONS, 'mlp_activation', config.mlp_activation,
         f'one of {MLP_ACTIVATIONS}')
  if config.ffn == 'moe':
    moe.validate(config)
  if config.name == 'vit':
    vit.validate(config)
  connections.validate(config.connection, config.d_model)
  embed_width = connections.layout(config.connection, config.d_model).embed_width
  if config.tie_embeddings and embed_width != config.d_model:
    _check(False, 'tie_embeddings', config.tie_embeddings,
           f'False when the connection widens the embedding (model.connection.kind='
           f'{config.connection.kind!r}: {embed_width} wide, model.d_model={config.d_model})')


def build_model(config, rngs: nnx.Rngs) -> nnx.Module:
  """Validates config.model and returns the model with freshly initialised, unplaced parameters."""
  validate(config)
  with nnx.use_eager_sharding(False):
    return MODELS[config.name](config, rngs=rngs)


def abstract_model(model_config, mesh: jax.sharding.Mesh, rules):
  """(graphdef, abstract_state) of the model: the state's leaves are ShapeDtypeStructs with
  NamedShardings on `mesh` (e.g. the restore target of a checkpoint). Allocates nothing."""
  abstract = nnx.eval_shape(lambda: build_model(model_config, nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)

  def with_sharding(variable):
    value = variable.get_value()
    return variable.replace(jax.ShapeDtypeStruct(
        value.shape, value.dtype, sharding=sharding.variable_sharding(variable, mesh, rules)))

  abstract_state = jax.tree.map(with_sharding, abstract_state,
                                is_leaf=lambda x: isinstance(x, nnx.Variable))
  return graphdef, abstract_state


def create_model(model_config, mesh: jax.sharding.Mesh, rules, seed: int):
  """Builds the model with its parameters created directly in their shards (a jitted
  initialisation with out_shardings: no parameter is ever whole on one device).

  Gives the same parameter values as build_model(model_config, nnx.Rngs(seed)).
  """
  graphdef, abstract_state = abstract_model(model_config, mesh, rules)
  shardings = jax.tree.map(lambda a: a.sharding, abstract_state)

  @functools.partial(jax.jit, out_shardings=shardings)
  def init():
    return nnx.state(build_model(model_config, nnx.Rngs(seed)))

  with sharding.activate(mesh, rules):
    state = init()
  return nnx.merge(graphdef, state)
