"""Parameter kinds: nnx.Variable subclasses that name a parameter's optimizer group.

The optimizer decides weight decay by type, never by parameter path:
  nnx.Param   weights of projections (decayed)
  Embedding   token / position embeddings (decayed only if config.optim.decay_embeddings)
  NormScale   scales of norms (never decayed)
  Bias        biases (never decayed)
  HCStatic    static HC coefficients and scalar gates: B, A_m, A_r, biases, s_alpha, s_beta (never decayed)
  HCDynamic   dynamic HC projection weights W_beta, W_m, W_r, phi (decayed, as the HC paper says)
  HCFrozen    HC coefficients made non-trainable by an ablation (not a Param: no gradient, no update)
"""

from flax import nnx


class Embedding(nnx.Param):
  pass


class NormScale(nnx.Param):
  pass


class Bias(nnx.Param):
  pass


class HCStatic(nnx.Param):
  pass


class HCDynamic(nnx.Param):
  pass


class HCFrozen(nnx.Variable):
  pass


def no_decay_types(decay_embeddings: bool) -> tuple[type, ...]:
  """Parameter types that get no weight decay."""
  types = (NormScale, Bias, HCStatic)
  return types if decay_embeddings else types + (Embedding,)
