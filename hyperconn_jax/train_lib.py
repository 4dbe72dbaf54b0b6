"""Training loop: sharded state, jitted train step, periodic eval, checkpoints, resume, preemption.

The state is a pytree of pure arrays (TrainState): parameters (nnx.Param and its subclasses),
the model's other variables (e.g. params.HCFrozen, never updated), the optax state and the step.
Gradients are taken only w.r.t. the parameters. All of it lives sharded on the mesh from creation
on and is donated to each step.

Loop order for update t (1-based; `step` counts finished updates):
  dispatch update t -> fetch the metrics of update t-1 (the host never waits on the step it just
  dispatched) -> if update t is an eval / checkpoint / last / preemption step: fetch its metrics
  too, check them, evaluate, save.
Metrics are checked for NaN/Inf when fetched; a checkpoint containing update t is written only
after update t's loss, gradient norm and parameter norm were seen to be finite.
"""

import dataclasses
import functools
import signal
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from hyperconn_jax import checkpoint
from hyperconn_jax import cli
from hyperconn_jax import config_lib
from hyperconn_jax import data
from hyperconn_jax import devices as devices_lib
from hyperconn_jax import evaluation
from hyperconn_jax import flops as flops_lib
from hyperconn_jax import metrics as metrics_lib
from hyperconn_jax import models
from hyperconn_jax import optim
from hyperconn_jax import paths
from hyperconn_jax import profiler
from hyperconn_jax import rundir
from hyperconn_jax import sharding
from hyperconn_jax import tasks

PyTree = Any
PROFILE_DIR = 'profile'  # Under the workdir.


@flax.struct.dataclass
class TrainState:
  step: jax.Array    # int32 scalar: updates done.
  params: PyTree     # pure nnx.State of the nnx.Param variables.
  rest: PyTree       # pure nnx.State of the other variables (constant during training).
  opt_state: PyTree  # optax state.


class NonFiniteError(FloatingPointError):
  """The loss, gradient norm or parameters became NaN / Inf."""


# ----------------------------------------------------------------------------- state and shardings


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything derived from the config and the mesh that the step functions need."""
  mesh: jax.sharding.Mesh
  rules: Any
  graphdef: nnx.GraphDef
  abstract_model: PyTree   # {'params', 'rest'}: ShapeDtypeStructs with shardings.
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: TrainState
  abstract_opt_state: PyTree
  batch_sharding: NamedSharding


def _path_suffix_shardings(abstract_opt_state: PyTree, abstract_params: PyTree,
                           replicated: NamedSharding) -> PyTree:
  """Shardings of an optax state: each leaf that is a copy of a parameter (Adam moments, ...)
  gets that parameter's sharding, found by the longest matching key-path suffix with the same
  shape; everything else (counts, scalars) is replicated."""
  by_path = {jax.tree_util.keystr(path): leaf
             for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params)}

  def pick(path, leaf):
    for start in range(len(path)):
      param = by_path.get(jax.tree_util.keystr(path[start:]))
      if param is not None and param.shape == leaf.shape:
        return param.sharding
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def make_setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules) -> Setup:
  """Builds the abstract model, optimizer and all shardings (allocates no parameters)."""
  graphdef, abstract_model, typed_params = checkpoint.abstract_model_state(
      config.model, mesh, rules)
  schedule = optim.make_schedule(config.optim, config.train.num_steps)
  tx = optim.make_optimizer(config.optim, config.train.num_steps,
                            optim.decay_mask(typed_params, config.optim.decay_embeddings))
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_shapes = jax.eval_shape(tx.init, abstract_model['params'])
  abstract_opt_state = jax.tree.map(
      lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), opt_shapes,
      _path_suffix_shardings(opt_shapes, abstract_model['params'], replicated))
  shardings_of = functools.partial(jax.tree.map, lambda x: x.sharding)
  state_shardings = TrainState(step=replicated, params=shardings_of(abstract_model['params']),
                               rest=shardings_of(abstract_model['rest']),
                               opt_state=shardings_of(abstract_opt_state))
  return Setup(mesh=mesh, rules=rules, graphdef=graphdef, abstract_model=abstract_model, tx=tx,
               schedule=schedule, state_shardings=state_shardings,
               abstract_opt_state=abstract_opt_state,
               batch_sharding=tasks.batch_sharding(config, mesh, rules))


def abstract_train_state(setup: Setup) -> TrainState:
  """The TrainState as ShapeDtypeStructs with their shardings (to lower the step without data)."""
  return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=setup.state_shardings.step),
                    params=setup.abstract_model['params'], rest=setup.abstract_model['rest'],
                    opt_state=setup.abstract_opt_state)


def abstract_batch(config: ml_collections.ConfigDict, setup: Setup) -> dict[str, jax.Array]:
  """A global training batch as ShapeDtypeStructs with the batch sharding (see tasks)."""
  shapes = tasks.of(config.model).batch_shapes(config, config.train.batch_size)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=setup.batch_sharding)
          for k, (shape, dtype) in shapes.items()}


def init_state(config: ml_collections.ConfigDict, setup: Setup) -> TrainState:
  """A fresh TrainState (parameters from config.seed), created directly in its shards."""
  model = models.create_model(config.model, setup.mesh, setup.rules, config.seed)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)
  opt_state = jax.jit(setup.tx.init, out_shardings=setup.state_shardings.opt_state)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), setup.state_shardings.step)
  return TrainState(step=step, params=params, rest=rest, opt_state=opt_state)


# ----------------------------------------------------------------------------- train step


def make_train_step(config: ml_collections.ConfigDict, setup: Setup):
  """The jitted update: (TrainState, global batch) -> (TrainState, metrics); the state is donated.

  Metrics (replicated float32 scalars): loss (mean cross-entropy per weighted token / example),
  z_loss (mean logsumexp^2, unscaled), grad_norm (before clipping), param_norm (after the update),
  lr (of this update), tokens (weighted target tokens / examples in the batch), and the task's
  own (tasks.train_metrics: classification accuracy, MoE auxiliary losses and expert load).
  Models with dropout get a key folded from config.seed and the step.
  """
  graphdef, tx, schedule = setup.graphdef, setup.tx, setup.schedule
  num_microbatches = config.optim.grad_accum_steps

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    dropout_key = jax.random.fold_in(jax.random.key(config.seed), state.step)

    def sums_fn(params, microbatch):
      net = nnx.merge(graphdef, params, state.rest)
      return tasks.loss_sums(config, net, microbatch, dropout_key)

    sums, grads = optim.accumulated_grads(sums_fn, state.params, batch, num_microbatches)
    denom = jnp.maximum(sums['weight'], 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        **tasks.train_metrics(sums, denom),
        'grad_norm': optax.tree.norm(grads),
        'param_norm': optax.tree.norm(params),
        'lr': schedule(state.step),
    }
    new_state = TrainState(step=state.step + 1, params=params, rest=state.rest,
                           opt_state=opt_state)
    return new_state, metrics

  replicated = NamedSharding(setup.mesh, PartitionSpec())
  batch_shardings = {k: setup.batch_sharding for k in ('inputs', 'targets', 'weights')}
  return jax.jit(train_step, in_shardings=(setup.state_shardings, batch_shardings),
                 out_shardings=(setup.state_shardings, replicated), donate_argnums=(0,))


def check_finite(step: int, metrics: dict[str, float]) -> None:
  """Raises NonFiniteError naming the update if its loss, grad norm or param norm is NaN/Inf."""
  bad = {k: metrics[k] for k in ('loss', 'grad_norm', 'param_norm') if not np.isfinite(metrics[k])}
  if bad:
    raise NonFiniteError(f'non-finite training metrics at step {step}: {bad}; stopping '
                         f'(no checkpoint containing step {step} was written).')


# ----------------------------------------------------------------------------- loop


class _StopFlag:
  """Set by SIGTERM (preemption): the loop saves the current step and returns.

  Single process only: a multi-process run must stop at the same step everywhere, which JAX's
  preemption service (it owns SIGTERM there) and orbax's reached_preemption agree on.
  """

  def __init__(self):
    self.set = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() > 1:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # Not in the main thread: no handler, no preemption support.
      self._previous = None
    return self

  def _handler(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint and stopping.')
    self.set = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def throughput_metrics(config: ml_collections.ConfigDict):
  """fn(updates per second) -> {'tflops_per_device', 'mfu'}: the model FLOPs of the step
  (hyperconn_jax.flops) achieved per device and their fraction of the device's peak
  (hyperconn_jax.devices: the vendor figure, or a measured matmul on CPU). The function returns {}
  for models the FLOPs formula does not describe (ViT, MoE)."""
  if tasks.of(config.model).name != 'lm' or config.model.ffn != 'dense':
    return lambda steps_per_sec: {}
  per_device = flops_lib.model_flops_per_step(config) / jax.device_count()
  peak = devices_lib.peak_flops_per_second(jax.local_devices()[0])

  def rates(steps_per_sec: float) -> dict[str, float]:
    achieved = per_device * steps_per_sec
    return {'tflops_per_device': achieved / 1e12, 'mfu': achieved / peak}

  return rates


def _count(tree: PyTree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _warn_config_changes(saved: dict[str, Any], current: dict[str, Any], prefix: str = '') -> None:
  """Logs a warning for each config field that differs from the checkpoint's config."""
  for key in sorted(set(saved) | set(current)):
    old, new = saved.get(key), current.get(key)
    if isinstance(old, dict) and isinstance(new, dict):
      _warn_config_changes(old, new, f'{prefix}{key}.')
    elif old != new:
      logging.warning('Resuming with config.%s%s=%r (the checkpoint was saved with %r).',
                      prefix, key, new, old)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains config.train.num_steps updates, resuming from WORKDIR/checkpoints if it holds any.

  Re-running with the same workdir continues exactly where the last checkpoint left off (same
  data order via the restored iterator state, same updates); a damaged newest checkpoint is moved
  aside with a warning and the previous one is used (checkpoint.Checkpointer.restore_latest). On
  SIGTERM (single process; once the data is prepared) the current step is saved and the function
  returns normally once the save is written.

  Args:
    config: the full (locked) config.
    workdir: output directory (a local path or an epath URL such as gs://BUCKET/run; see
      rundir.py): checkpoints/, metrics.jsonl, tensorboard/, config.json, run.json.

  Returns:
    {'step': last step, plus the last training metrics and the last eval metrics (if any)}.

  Raises:
    cli.UsageError (a ValueError): a bad config, a workdir that cannot be written or
      (multi-process) is not shared by every process, all before anything is compiled.
    ValueError: checkpoints written by another number of processes.
    NonFiniteError: NaN / Inf loss, gradient or parameters (the message names the step).
    checkpoint.DamagedCheckpointError: the workdir has checkpoints but none can be restored.
  """
  # Validated here, once, for every caller; bad input raises cli.UsageError (a ValueError), which
  # the entry points print as one line.
  with cli.usage_errors():
    config_lib.validate(config)
    config_lib.validate_mesh_for_devices(config, jax.device_count())
    rundir.ensure_writable(workdir)
    rundir.ensure_shared(workdir)
  if config.train.compilation_cache_dir:
    # Before the first compilation of the process: JAX decides once whether to use the cache.
    jax.config.update('jax_compilation_cache_dir', config.train.compilation_cache_dir)
  data.ensure_prepared(config)
  is_chief = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  config_json = rundir.config_to_json(config)
  facts = metrics_lib.run_facts(mesh)
  metrics_lib.log_run_start(workdir, config_json, facts, enabled=is_chief)

  with sharding.activate(mesh, rules), _StopFlag() as stop:
    setup = make_setup(config, mesh, rules)
    logging.info('Model: %s parameters, %s other variables.',
                 f'{_count(setup.abstract_model["params"]):,}',
                 f'{_count(setup.abstract_model["rest"]):,}')
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
    writer = progress = None
    profile = profiler.ProfileWindow(str(paths.as_path(workdir) / PROFILE_DIR),
                                     start_step=config.train.profile_start_step,
                                     num_steps=config.train.profile_num_steps, enabled=is_chief)
    try:
      train_iter = data.make_train_iterator(config, process_index=jax.process_index(),
                                            process_count=jax.process_count())
      latest = ckpt.restore_latest(model=setup.abstract_model,
                                   opt_state=setup.abstract_opt_state, data_iter=train_iter)
      if latest is None:
        state = init_state(config, setup)
        start = 0
        logging.info('Starting from scratch (seed %d).', config.seed)
      else:
        start, restored = latest
        state = TrainState(
            step=jax.device_put(jnp.asarray(start, jnp.int32), setup.state_shardings.step),
            params=restored['model']['params'], rest=restored['model']['rest'],
            opt_state=restored['opt_state'])
        logging.info('Resumed from checkpoint step %d in %s.', start, ckpt.directory)
        _warn_config_changes(ckpt.restore_json(start, 'config'), config_json)
      train_step = make_train_step(config, setup)
      evaluator = evaluation.Evaluator(config, setup.graphdef,
                                       {'params': setup.state_shardings.params,
                                        'rest': setup.state_shardings.rest},
                                       setup.batch_sharding)
      writer = metrics_lib.MetricWriter(workdir, enabled=is_chief,
                                        resume_step=start if start > 0 else None)
      progress = metrics_lib.Progress(enabled=is_chief, start_step=start,
                                      num_steps=config.train.num_steps)
      result = _loop(config, setup, state, start, train_iter, train_step, evaluator, ckpt,
                     writer, progress, stop, facts, profile)
    finally:
      profile.close()
      if progress is not None:
        progress.close()
      ckpt.wait()  # Saves already started hold finite, checked states: let them finish.
      ckpt.close()
      if writer is not None:
        writer.close()
  return result


def _loop(config, setup, state, start, train_iter, train_step, evaluator, ckpt, writer,
          progress, stop, meta, profile) -> dict[str, Any]:
  """The update loop of train_and_evaluate (see the module docstring for the order); `meta`, the
  run facts, goes into every checkpoint; `profile` traces its window of updates."""
  num_steps = config.train.num_steps
  train_cfg = config.train
  multi_process = jax.process_count() > 1
  pending = None  # (step, device metrics) of the last dispatched update, not yet fetched.
  last_train, last_eval = {}, {}
  throughput = throughput_metrics(config)

  def fetch(step, device_metrics):
    nonlocal last_train
    host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    check_finite(step, host)
    progress.update(step, host['loss'], host['tokens'])
    if step % train_cfg.log_every == 0 or step == num_steps:
      tokens_per_sec, steps_per_sec = progress.throughput()
      row = dict(host, tokens_per_sec=tokens_per_sec, **throughput(steps_per_sec))
      writer.write(step, row)
      logging.info('step %d: %s', step, ', '.join(f'{k}={v:.4g}' for k, v in row.items()))
    last_train = host

  if start >= num_steps:
    logging.info('Checkpoint step %d >= train.num_steps=%d: nothing to train.', start, num_steps)
  step = start
  while step < num_steps:
    local = next(train_iter)
    profile.before_update(step + 1)
    state, device_metrics = train_step(state, evaluation.global_batch(local, setup.batch_sharding))
    step += 1
    profile.after_update(step, (state, device_metrics))
    if pending is not None:
      fetch(*pending)
    pending = (step, device_metrics)

    preempted = ckpt.reached_preemption(step) if multi_process else stop.set
    # On preemption time is short: save without evaluating.
    do_eval = not preempted and (step % train_cfg.eval_every == 0 or step == num_steps)
    do_save = do_eval or step % train_cfg.checkpoint_every == 0 or preempted
    if not do_save:
      continue
    fetch(*pending)  # Update `step` must be finite before it is evaluated or saved.
    pending = None
    eval_metrics = None
    if do_eval:
      eval_metrics = evaluator({'params': state.params, 'rest': state.rest})
      writer.write(step, eval_metrics)
      logging.info('step %d eval: %s', step,
                   ', '.join(f'{k}={v:.4g}' for k, v in eval_metrics.items()))
      last_eval = eval_metrics
    ckpt.save(step, model={'params': state.params, 'rest': state.rest},
              opt_state=state.opt_state, data_iter=train_iter,
              config_json=rundir.config_to_json(config), meta=meta, metrics=eval_metrics)
    writer.flush()  # The rows up to a checkpoint must be in the workdir before it can resume.
    if preempted:
      logging.warning('Stopping after step %d (preemption); checkpoint saved.', step)
      break
  if pending is not None:
    fetch(*pending)
  return {'step': step, **last_train, **last_eval}
