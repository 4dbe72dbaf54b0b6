"""Tests of the MoE FFN and the MoE decoder: top-k outputs against a loop-over-experts reference
(dropless and capacity dispatch, incl. which assignments are dropped), auxiliary losses on a
hand-made routing, the training objective, init equivalence HC vs Pre-Norm, sharded == unsharded,
validation and the OLMoE-1B-7B parameter count."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from jax.sharding import PartitionSpec as P

from configs import base
from configs import moe as moe_configs
from hyperconn_jax import models, sharding, tasks
from hyperconn_jax.models import moe, sizes, trunk

B, L, V = 2, 8, 64


def moe_config(kind='residual_prenorm', capacity_factor=0.0, **connection):
  """A tiny fp32 MoE decoder: d 32, 2 layers, 4 experts of hidden 32, top-2."""
  c = helpers.tiny_model(kind, **connection)
  c.update(dict(vocab_size=V, mlp_dim=32, ffn='moe'))
  c.moe.update(dict(num_experts=4, top_k=2, capacity_factor=capacity_factor))
  return c


def reference(layer, y_TxD, capacity_factor=0.0):
  """Loop-over-experts numpy reference: out_t = sum over the kept top-k assignments of
  weight * SwiGLU_e(y_t); with a capacity, assignments take slots choice-major, then by token."""
  y = np.asarray(y_TxD, np.float64)
  router, gate, up, down = (np.asarray(layer.router[...], np.float64),
                            np.asarray(layer.gate[...], np.float64),
                            np.asarray(layer.up[...], np.float64),
                            np.asarray(layer.down[...], np.float64))
  num_tokens, num_experts, k = y.shape[0], router.shape[1], layer.top_k
  logits = y @ router
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  chosen = np.argsort(-probs, axis=-1)[:, :k]
  slots = (moe.capacity(num_tokens, k, num_experts, capacity_factor) if capacity_factor
           else num_tokens)
  kept = np.zeros((num_tokens, k), bool)
  used = np.zeros(num_experts, int)
  for j in range(k):
    for t in range(num_tokens):
      e = chosen[t, j]
      if used[e] < slots:
        kept[t, j], used[e] = True, used[e] + 1
  out = np.zeros_like(y)
  for e in range(num_experts):
    h = y @ gate[e]
    expert_out = (h / (1 + np.exp(-h)) * (y @ up[e])) @ down[e]
    weight_T = np.sum(np.where((chosen == e) & kept, probs[np.arange(num_tokens), e][:, None],
                               0.0), axis=1)
    out += weight_T[:, None] * expert_out
  return out, 1.0 - kept.mean()


@pytest.mark.parametrize('capacity_factor', [0.0, 4.0, 0.5])
def test_moe_equals_loop_over_experts(capacity_factor):
  """Each token's output is the weighted sum of exactly its top-k experts (minus, with a small
  capacity, the assignments that found no slot)."""
  cfg = moe_config(capacity_factor=capacity_factor)
  with nnx.use_eager_sharding(False):
    layer = moe.MoE(cfg, out_init_multiplier=1.0, rngs=nnx.Rngs(0))
  y_BxLxD = jax.random.normal(jax.random.key(1), (B, L, cfg.d_model))
  out_BxLxD, aux = nnx.jit(lambda m, y: m(y))(layer, y_BxLxD)
  expected, dropped = reference(layer, y_BxLxD.reshape(B * L, -1), capacity_factor)
  np.testing.assert_allclose(np.asarray(out_BxLxD).reshape(B * L, -1), expected, atol=1e-5)
  np.testing.assert_allclose(float(aux['dropped_fraction']), dropped, atol=1e-6)
  if capacity_factor == 0.5:
    assert dropped > 0  # The case really drops something.
  else:
    assert dropped == 0


def test_aux_losses_on_hand_made_routing():
  probs = np.array([[0.6, 0.25, 0.1, 0.05],
                    [0.05, 0.6, 0.25, 0.1],
                    [0.5, 0.3, 0.15, 0.05],
                    [0.1, 0.05, 0.25, 0.6]])
  shifts = np.array([0.0, 1.0, 2.0, -1.0])  # logsumexp of each row.
  logits = jnp.asarray(np.log(probs) + shifts[:, None], jnp.float32)
  weights, experts, aux = moe.route(logits, top_k=2, renormalize=False)
  # Top-2: {0, 1}, {1, 2}, {0, 1}, {3, 2} -> 2, 3, 2, 1 of the 8 assignments.
  np.testing.assert_array_equal(np.sort(np.asarray(experts), axis=1),
                                [[0, 1], [1, 2], [0, 1], [2, 3]])
  np.testing.assert_allclose(aux['expert_load'], [0.25, 0.375, 0.25, 0.125], atol=1e-6)
  # Mean probabilities [0.3125, 0.3, 0.1875, 0.2]: 4 * (0.078125 + 0.1125 + 0.046875 + 0.025).
  np.testing.assert_allclose(float(aux['load_balance_loss']), 1.05, atol=1e-5)
  np.testing.assert_allclose(float(aux['router_z_loss']), (0 + 1 + 4 + 1) / 4, atol=1e-5)
  np.testing.assert_allclose(weights[0], [0.6, 0.25], atol=1e-6)
  renormalized, _, _ = moe.route(logits, top_k=2, renormalize=True)
  np.testing.assert_allclose(renormalized[0], [0.6 / 0.85, 0.25 / 0.85], atol=1e-6)


def test_training_objective_adds_weighted_aux_losses():
  config = base.get_config()
  config.model = moe_config('hc', n=2)
  config.model.moe.update(load_balance_weight=0.5, router_z_weight=0.25)
  net = models.build_model(config.model, nnx.Rngs(0))
  tok = jax.random.randint(jax.random.key(0), (B, L + 1), 0, V)
  batch = {'inputs': tok[:, :-1], 'targets': tok[:, 1:],
           'weights': jnp.ones((B, L)).at[0, :3].set(0.0)}
  def aux_only(model):
    a = model.forward(batch['inputs']).aux
    return a['load_balance_loss'] + a['router_z_loss'], a

  @nnx.jit
  def run(model):
    return tasks.loss_sums(config, model, batch), nnx.grad(aux_only, has_aux=True)(model)

  sums, (grads, aux) = run(net)
  weight = float(sums['weight'])
  assert weight == B * L - 3
  expected = float(sums['ce']) + weight * (0.5 * float(aux['load_balance_loss'])
                                           + 0.25 * float(aux['router_z_loss']))
  np.testing.assert_allclose(float(sums['objective']), expected, rtol=1e-6)
  metrics = tasks.train_metrics(sums, jnp.asarray(weight))
  np.testing.assert_allclose(sum(float(metrics[f'moe_load/e{e:02d}']) for e in range(4)), 1.0,
                             atol=1e-5)
  assert float(metrics['moe_max_load']) >= 1.0
  np.testing.assert_allclose(float(metrics['moe_load_balance_loss']),
                             float(aux['load_balance_loss']), rtol=1e-6)
  # The aux losses reach the router: their gradient alone is non-zero.
  assert float(jnp.abs(helpers.flat(grads)[('blocks', 'mlp', 'router')]).max()) > 0


@pytest.mark.parametrize('capacity_factor', [0.0, 1.0])
def test_init_equals_prenorm(capacity_factor):
  """DHC x4 wrapping the MoE sub-layer starts as Pre-Norm (same logits, same routing).

  HC's final norm sees the sum of n identical streams; a negligible norm eps makes it
  scale-invariant (see test_model.test_init_equals_prenorm)."""
  tok = jax.random.randint(jax.random.key(0), (B, L), 0, V)
  ref_cfg = moe_config(capacity_factor=capacity_factor)
  hc_cfg = moe_config('hc', capacity_factor, n=4, dynamic=True)
  ref_cfg.norm_eps = hc_cfg.norm_eps = 1e-12
  prenorm = models.build_model(ref_cfg, nnx.Rngs(0))
  hc = models.build_model(hc_cfg, nnx.Rngs(1))
  src, dst = helpers.flat(prenorm), helpers.flat(hc)
  shared = [k for k in dst if not any(a in trunk.CONNECTION_ATTRS for a in k)]
  assert ('blocks', 'mlp', 'gate') in shared
  helpers.set_flat(hc, {**dst, **{k: src[k] for k in shared}})

  @nnx.jit
  def forward(m, t):
    out = m.forward(t)
    return out.logits, out.aux

  expected, aux_expected = forward(prenorm, tok)
  logits, aux = forward(hc, tok)
  assert float(jnp.max(jnp.abs(logits - expected)) / jnp.max(jnp.abs(expected))) < 1e-5
  for key in aux_expected:
    np.testing.assert_allclose(aux[key], aux_expected[key], atol=1e-5, err_msg=key)


@pytest.mark.parametrize('capacity_factor', [0.0, 1.0])
def test_sharded_equals_unsharded(capacity_factor):
  """On the (2, 2, 2) mesh the experts are split over 'data'; loss and aux (dropless and
  capacity dispatch) and gradients (capacity: the expert-parallel einsums) match the
  single-device model with the same weights."""
  cfg = moe_config('hc', capacity_factor, n=2, dynamic=True)
  mesh_cfg = base.get_config().mesh
  mesh_cfg.shape = (2, 2, 2)
  mesh, rules = sharding.make_mesh(mesh_cfg), sharding.logical_rules(mesh_cfg)
  with sharding.activate(mesh, rules):  # As train_lib creates it.
    model = models.create_model(cfg, mesh, rules, seed=0)
  params = helpers.flat(model)
  assert params[('blocks', 'mlp', 'gate')].sharding.spec == P(None, 'data', 'fsdp', 'tensor')
  tok = jax.random.randint(jax.random.key(0), (4, L), 0, V)

  def loss(m, t):
    logits, _, aux = m.forward(t)
    return jnp.mean(logits ** 2) + aux['load_balance_loss'] + aux['router_z_loss'], aux

  def run(m, t):
    if capacity_factor:
      return nnx.value_and_grad(loss, has_aux=True)(m, t)
    return loss(m, t), None

  with sharding.activate(mesh, rules):
    tok_sharded = jax.device_put(tok, sharding.batch_sharding(mesh, rules))
    (value, aux), grads = nnx.jit(run)(model, tok_sharded)
  single = models.build_model(cfg, nnx.Rngs(0))
  helpers.set_flat(single, {k: jax.device_get(v) for k, v in params.items()})
  (value_1, aux_1), grads_1 = nnx.jit(run)(single, tok)
  np.testing.assert_allclose(float(value), float(value_1), rtol=1e-5)
  for key in aux_1:
    np.testing.assert_allclose(aux[key], aux_1[key], atol=1e-5, err_msg=key)
  if not capacity_factor:
    return
  g, g1 = helpers.flat(grads), helpers.flat(grads_1)
  for k, v in g1.items():
    np.testing.assert_allclose(np.asarray(g[k]), np.asarray(v), atol=1e-5, rtol=1e-4,
                               err_msg=str(k))


@pytest.mark.parametrize('field, value', [('num_experts', 0), ('top_k', 5), ('top_k', 0),
                                          ('capacity_factor', -1.0), ('renormalize', 1),
                                          ('load_balance_weight', -0.1)])
def test_validate_names_the_field(field, value):
  helpers.assert_validate_names_field(moe_config(), 'moe', field, value)


def test_configs_validate():
  for size in ('tiny', 'cpu', 'olmoe_1b_7b'):
    config = moe_configs.get_config(f'connection=hc,n=4,size={size}')
    models.validate(config.model)
    assert config.model.ffn == 'moe'
  olmoe = moe_configs.get_config('size=olmoe_1b_7b').model
  assert (olmoe.moe.num_experts, olmoe.moe.top_k, olmoe.d_model, olmoe.num_layers) == (64, 8, 2048,
                                                                                       16)


def test_olmoe_param_count():
  """OLMoE-1B-7B: 16 x (64 experts x 3 x 2048 x 1024 + attention 4 x 2048^2 + router 2048 x 64)
  + untied embeddings 2 x 50304 x 2048 = 6,919,028,736, plus the RMSNorm / QK-norm scales; HC
  Table 7 lists 6.91909427B. DHC x4 adds 394,048 (Table 7: 0.0003940B)."""
  cfg = base.get_config().model
  sizes.apply_size(cfg, 'olmoe_1b_7b')
  cfg.connection.kind = 'residual_prenorm'
  core = 16 * (64 * 3 * 2048 * 1024 + 4 * 2048**2 + 2048 * 64) + 2 * 50304 * 2048
  norms = 16 * (2 * 2048 + 2 * 128) + 2048
  assert sizes.count_params(cfg) == core + norms
  assert math.isclose(core + norms, 6.91909427e9, rel_tol=2e-5)
  cfg.connection.kind = 'hc'
  cfg.connection.hc.update(n=4, dynamic=True)
  assert sizes.param_counts(cfg)['connection'] == 394_048
