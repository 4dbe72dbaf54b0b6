"""Checkpointing the train iterator: grain's orbax handler (one JSON state file per process,
process_<i>-of-<n>.json), plus restoring on another process count.

A train iterator of data/pipeline.py with data.worker_count = 0 keeps its state per shard
(pipeline.merge_states). When the checkpoint was written by another number of processes, every
process reads all the saved files, merges their shards and takes its own: with a fixed
data.num_shards the run continues exactly as it would have on the old process count. States
that are not per shard (grain worker processes, images) or of other shards cannot be redistributed:
`restorable` says so before anything is restored, so the caller can refuse with a clear error.
"""

import dataclasses
import json
from typing import Any

from etils import epath
from grain._src.python.checkpoint import handler as grain_handler  # pylint: disable=g-direct-tensorflow-import
import jax
import orbax.checkpoint as ocp

from hyperconn_jax.data import pipeline


def _own_file(directory: epath.Path) -> epath.Path:
  return directory / f'process_{jax.process_index()}-of-{jax.process_count()}.json'


def _saved_states(directory: epath.Path) -> list:
  return [json.loads(f.read_text()) for f in sorted(directory.glob('process_*-of-*.json'))]


def restorable(directory, data_iter) -> bool:
  """Whether data_iter can take the state saved in `directory` (a step's data_iter item): saved
  by this process count, or per shard with the same shards as data_iter's (a fixed data.num_shards
  and data.worker_count = 0)."""
  directory = epath.Path(directory)
  if _own_file(directory).exists():
    return True
  merged = pipeline.merge_states(_saved_states(directory))
  ours = pipeline.merge_states([data_iter.get_state()])
  return merged is not None and ours is not None and merged['num_shards'] == ours['num_shards']


class Handler(grain_handler.CheckpointHandler):
  """grain's handler; restores a per-shard state saved by another number of processes."""

  def restore(self, directory: epath.Path, item: Any = None, args: Any = None):
    item = item or args.item
    if _own_file(directory).exists():
      return super().restore(directory, item=item)
    merged = pipeline.merge_states(_saved_states(directory))
    if merged is None:
      raise ValueError(f'{directory} holds data iterator states of another process count that '
                       'are not per shard; resume with the process count that wrote them.')
    item.set_state(merged)
    item.start_prefetch()
    return item


@ocp.args.register_with_handler(Handler, for_save=True)
@dataclasses.dataclass
class Save(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(Handler, for_restore=True)
@dataclasses.dataclass
class Restore(ocp.args.CheckpointArgs):
  item: Any
