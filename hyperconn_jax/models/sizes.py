"""Named model shapes and parameter counting (by abstract evaluation: nothing is allocated).

OLMo shapes follow the HC paper's baselines (HC Table 7: OLMo-1B 1.17676442B, OLMo-7B 6.88809574B,
OLMoE-1B-7B 6.91909427B parameters). SwiGLU hidden sizes are the size of one of the two input projections.
"""

import jax
import numpy as np
from flax import nnx

from hyperconn_jax import params
from hyperconn_jax.models import build_model, trunk

SIZES = {
    # The CPU-sized shapes live with their training setups in configs/lm.py (tiny, cpu).
    'olmo_1b': dict(vocab_size=50304, d_model=2048, num_layers=16, num_heads=16, head_dim=128,
                    mlp_dim=8192, tie_embeddings=True),
    'olmo_7b': dict(vocab_size=50304, d_model=4096, num_layers=32, num_heads=32, head_dim=128,
                    mlp_dim=11008, tie_embeddings=False),
    # OLMoE-1B-7B: 64 SwiGLU experts of hidden 1024, top-8 (raw softmax weights), no shared
    # expert, RMSNorm, QK-norm (per head here; OLMoE normalises the full d_model q / k), untied.
    'olmoe_1b_7b': dict(vocab_size=50304, d_model=2048, num_layers=16, num_heads=16,
                        head_dim=128, mlp_dim=1024, tie_embeddings=False, norm='rmsnorm',
                        qk_norm=True, ffn='moe',
                        moe=dict(num_experts=64, top_k=8, renormalize=False,
                                 load_balance_weight=0.01, router_z_weight=0.001)),
    # ViT-B/16 and ViT-L/16 on 224 x 224 ImageNet (1000 classes), GELU MLP, LayerNorm with scale.
    'vit_b16': dict(name='vit', d_model=768, num_layers=12, num_heads=12, head_dim=64,
                    mlp_dim=3072, mlp_activation='gelu', norm='layernorm', norm_affine=True,
                    vit=dict(image_size=224, patch_size=16, channels=3, num_classes=1000)),
    'vit_l16': dict(name='vit', d_model=1024, num_layers=24, num_heads=16, head_dim=64,
                    mlp_dim=4096, mlp_activation='gelu', norm='layernorm', norm_affine=True,
                    vit=dict(image_size=224, patch_size=16, channels=3, num_classes=1000)),
}


def apply_size(model_config, name: str) -> None:
  """Sets the shape fields of config.model (in place) to the named size."""
  if name not in SIZES:
    raise ValueError(f'model size must be one of {tuple(SIZES)}, got {name!r}')
  model_config.update(SIZES[name])


def param_counts(model_config) -> dict[str, int]:
  """Number of parameters of the model config.model describes, without allocating it.

  Returns {'total', 'connection', 'other'}: 'connection' counts everything inside the connection
  modules (expand / reduce and every sub-layer's connection, frozen HC coefficients included),
  'other' the rest (embedding, attention, MLP, norms, unembedding).
  """
  abstract = nnx.eval_shape(lambda: build_model(model_config, nnx.Rngs(0)))
  state = nnx.state(abstract, (nnx.Param, params.HCFrozen))
  counts = {'connection': 0, 'other': 0}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    keys = {getattr(k, 'key', None) for k in path}
    group = 'connection' if keys & set(trunk.CONNECTION_ATTRS) else 'other'
    counts[group] += int(np.prod(leaf.shape))
  counts['total'] = counts['connection'] + counts['other']
  return counts


def count_params(model_config) -> int:
  """Total number of parameters of the model config.model describes (no allocation)."""
  return param_counts(model_config)['total']
