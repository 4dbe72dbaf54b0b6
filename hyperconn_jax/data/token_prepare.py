"""Tokenizes a corpus once into token shards (token_shards.py), with worker processes, a progress
bar and resume after interruption. The command line is prepare.py.

Sources (`source`):
  a glob of files (any etils.epath location, '**' recurses), by suffix:
    .jsonl / .json / .jsonl.gz / .json.gz   one document per line, its text in field `text_key`
    .parquet                                one document per row, its text in column `text_key`
    anything else                           UTF-8 text, one document per file, cut after line
                                            breaks into pieces of at most `piece_chars` characters
  'tfds:NAME' (e.g. 'tfds:lm1b', 'tfds:c4/en:3.1.0') a prepared TFDS dataset in `tfds_data_dir`:
    array_record through tfds data sources; TFRecord through TFDS when TensorFlow is installed.

Files are split into train / validation by document: document (or piece) number k of the file at
relative path REL has the key 'REL#k' and goes to validation when a stable hash of the key is below
`eval_fraction`; the split of a document never depends on the other files. A TFDS dataset keeps its
own splits (`tfds_splits`: its train and eval split names).

A unit of work is one file, or TFDS_UNIT examples of a TFDS split. `plan.json` records the source,
the tokenizer and the units; a rerun with the same plan skips the units whose `done-<unit>.json`
marker exists, so an interrupted preparation resumes and ends with the same files as one that ran
through. meta.json is written last.
"""

import dataclasses
import glob as glob_lib
import gzip
import io
import json
import multiprocessing
import os
import time

from etils import epath
import tensorflow_datasets as tfds
import tqdm

from hyperconn_jax.data import builders
from hyperconn_jax.data import token_shards
from hyperconn_jax.data import tokenizers

TFDS_PREFIX = 'tfds:'
TFDS_UNIT = 10_000
TRAIN, VALIDATION = 'train', 'validation'
_ENCODE_BATCH = 256  # Documents handed to the tokenizer at once.
PLAN = 'plan.json'


@dataclasses.dataclass(frozen=True)
class Options:
  """What to prepare (see the module docstring); tokenizer / tokenizer_path as in config.data."""
  source: str
  out: str
  tokenizer: str = 'bytes'
  tokenizer_path: str = ''
  text_key: str = 'text'
  eval_fraction: float = 0.03
  piece_chars: int = 16384
  tfds_data_dir: str = ''
  tfds_splits: tuple[str, str] = ('train', 'validation')
  workers: int = 1


def _is_remote(path: str) -> bool:
  return '://' in path


def expand_source(pattern: str) -> tuple[epath.Path, list[str]]:
  """(root, sorted relative paths of the files) of a glob: local ('**' recurses) or in a bucket
  ('*' within one level: a recursive listing of a bucket can take thousands of requests)."""
  if not _is_remote(pattern):
    pattern = os.path.abspath(os.path.expanduser(pattern))
    root = builders.glob_root(pattern)
    files = [p for p in glob_lib.glob(pattern, recursive=True) if os.path.isfile(p)]
    return epath.Path(root), sorted(os.path.relpath(p, root) for p in files)
  if '**' in pattern:
    raise ValueError(f"--source={pattern!r}: '**' is not supported in a bucket; list each level "
                     "with '*' (e.g. gs://b/corpus/*/*.parquet).")
  parts = pattern.split('/')
  fixed = next((i for i, p in enumerate(parts) if glob_lib.has_magic(p)), len(parts) - 1)
  root = epath.Path('/'.join(parts[:fixed]))
  files = [p for p in root.glob('/'.join(parts[fixed:])) if p.is_file()]
  return root, sorted(str(p.relative_to(root)) for p in files)


def _file_kind(rel: str) -> str:
  name = rel.lower().removesuffix('.gz')
  if name.endswith(('.jsonl', '.json')):
    return 'jsonl'
  return 'parquet' if name.endswith('.parquet') else 'text'


def _plan(options: Options, identity: dict) -> dict:
  """The units of work and everything the output depends on."""
  if options.source.startswith(TFDS_PREFIX):
    name = options.source.removeprefix(TFDS_PREFIX)
    builder = _tfds_builder(name, options.tfds_data_dir)
    units = []
    for out_split, split in zip((TRAIN, VALIDATION), options.tfds_splits):
      if split not in builder.info.splits:
        raise ValueError(f'TFDS dataset {name!r} has no split {split!r} (--tfds_splits); it has '
                         f'{sorted(builder.info.splits.keys())}.')
      n = builder.info.splits[split].num_examples
      units += [{'tfds': name, 'split': split, 'out_split': out_split, 'start': start,
                 'end': min(start + TFDS_UNIT, n)} for start in range(0, n, TFDS_UNIT)]
  else:
    root, rel_paths = expand_source(options.source)
    if not rel_paths:
      raise ValueError(f'--source={options.source!r} matches no file.')
    units = [{'root': str(root), 'rel': rel, 'kind': _file_kind(rel)} for rel in rel_paths]
  return {'source': options.source, 'tokenizer': identity, 'text_key': options.text_key,
          'eval_fraction': options.eval_fraction, 'piece_chars': options.piece_chars,
          'tfds_splits': list(options.tfds_splits), 'units': units}


def _tfds_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'--source=tfds:{name}: TFDS cannot open it ({e}).') from None
  if not builder.is_prepared():
    raise ValueError(f'--source=tfds:{name} is not prepared in --tfds_data_dir={data_dir!r}: '
                     f'prepare it first with `tfds build {name} --data_dir=DIR`.')
  return builder


def _tfds_examples(unit: dict, data_dir: str):
  """The examples [start, end) of a TFDS split, from array_record or (with TensorFlow) TFRecord."""
  builder = _tfds_builder(unit['tfds'], data_dir)
  file_format = builder.info.file_format
  if file_format is None or file_format.value == 'array_record':
    source = builder.as_data_source(split=unit['split'])
    for i in range(unit['start'], unit['end']):
      yield source[i]
    return
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import  (optional, heavy)
  except ImportError:
    raise ValueError(
        f"TFDS dataset {unit['tfds']!r} is prepared as {file_format.value}, which TFDS reads only "
        'with TensorFlow: pip install tensorflow (CPU is enough), or prepare it as array_record:\n'
        f"  tfds build {unit['tfds']} --data_dir=DIR --file_format=array_record") from None
  split = f"{unit['split']}[{unit['start']}:{unit['end']}]"
  yield from tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))


def _documents(unit: dict, options: Options):
  """(key, text) of every document of a unit; key None for TFDS (its split is given)."""
  text_key = options.text_key
  if 'tfds' in unit:
    for example in _tfds_examples(unit, options.tfds_data_dir):
      yield None, example[text_key]
    return
  rel, path = unit['rel'], epath.Path(unit['root']) / unit['rel']
  if unit['kind'] == 'text':
    text = path.read_bytes().decode('utf-8', errors='replace')
    for k, piece in enumerate(builders.split_pieces(text, options.piece_chars)):
      yield f'{rel}#{k}', piece
  elif unit['kind'] == 'jsonl':
    with path.open('rb') as raw:
      f = gzip.open(raw) if rel.endswith('.gz') else raw
      for k, line in enumerate(io.TextIOWrapper(f, encoding='utf-8')):
        if line.strip():
          record = json.loads(line)
          if text_key not in record:
            raise ValueError(f'{path} line {k + 1} has no field {text_key!r} (--text_key); '
                             f'it has {sorted(record)}.')
          yield f'{rel}#{k}', record[text_key]
  else:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  (parquet sources only)
    with path.open('rb') as f:
      parquet = pq.ParquetFile(f)
      if text_key not in parquet.schema_arrow.names:
        raise ValueError(f'{path} has no column {text_key!r} (--text_key); it has '
                         f'{parquet.schema_arrow.names}.')
      k = 0
      for batch in parquet.iter_batches(columns=[text_key], batch_size=1024):
        for text in batch.column(0).to_pylist():
          yield f'{rel}#{k}', text or ''
          k += 1


_worker = {}  # Per process: the options and the tokenizer.


def _init_worker(options: Options) -> None:
  _worker['options'] = options
  _worker['tokenizer'] = tokenizers.get_tokenizer(options)


def _run_unit(index_unit) -> tuple[int, dict, float]:
  """Tokenizes one unit into its shards and writes its marker; returns (unit, marker, seconds)."""
  index, unit = index_unit
  start = time.perf_counter()
  options, tokenizer = _worker['options'], _worker['tokenizer']
  out = epath.Path(options.out)
  dtype = token_shards.dtype_for(tokenizer.vocab_size)
  writers = {split: token_shards.ShardWriter(out, token_shards.shard_name(split, index), dtype)
             for split in ((unit['out_split'],) if 'tfds' in unit else (TRAIN, VALIDATION))}
  batch = []

  def flush():
    for (key, _), tokens in zip(batch, tokenizer.encode_batch([text for _, text in batch])):
      if key is None:
        writers[unit['out_split']].add(tokens)
      else:
        validation = builders.in_validation(key, options.eval_fraction)
        writers[VALIDATION if validation else TRAIN].add(tokens)
    batch.clear()

  for key, text in _documents(unit, options):
    if text:
      batch.append((key, text))
    if len(batch) >= _ENCODE_BATCH:
      flush()
  flush()
  marker = {split: writer.write() for split, writer in writers.items()}
  write_marker(out, index, marker)
  return index, marker, time.perf_counter() - start


def write_marker(out: epath.Path, index: int, marker: dict) -> None:
  """The last write of a unit: it is done."""
  (out / token_shards.done_name(index)).write_text(json.dumps(marker))


def prepare(options: Options) -> dict:
  """Prepares (or resumes preparing) options.source into token shards at options.out.

  Returns:
    The meta.json written (see token_shards).

  Raises:
    ValueError: a bad source, a TFDS dataset that cannot be read here, or an options.out holding
      a preparation of something else.
  """
  tokenizer = tokenizers.get_tokenizer(options)
  out = epath.Path(options.out)
  plan = _plan(options, tokenizer.identity)
  out.mkdir(parents=True, exist_ok=True)
  plan_path = out / PLAN
  if plan_path.exists():
    if json.loads(plan_path.read_text()) != plan:
      raise ValueError(
          f'--out={options.out} holds a preparation of another source, tokenizer or split '
          f'({PLAN} differs); delete it or choose another --out.')
  else:
    plan_path.write_text(json.dumps(plan))
  existing = set(p.name for p in out.glob('done-*.json'))
  todo = [(i, u) for i, u in enumerate(plan['units'])
          if token_shards.done_name(i) not in existing]
  tokens_done = 0
  with tqdm.tqdm(total=len(plan['units']), initial=len(plan['units']) - len(todo),
                 unit='unit', desc=f'tokenizing into {options.out}') as bar:
    start = time.perf_counter()

    def progress(result):
      nonlocal tokens_done
      _, marker, _ = result
      tokens_done += sum(shard['num_tokens'] for shard in marker.values())
      bar.set_postfix(tokens=f'{tokens_done:.3g}',
                      tokens_per_s=f'{tokens_done / (time.perf_counter() - start):.3g}')
      bar.update()

    if options.workers <= 1 or len(todo) <= 1:
      _init_worker(options)
      for item in todo:
        progress(_run_unit(item))
    else:
      # spawn: the tokenizers' own threads do not survive a fork.
      context = multiprocessing.get_context('spawn')
      with context.Pool(options.workers, _init_worker, (options,)) as pool:
        for result in pool.imap_unordered(_run_unit, todo):
          progress(result)
  splits = {TRAIN: [], VALIDATION: []}
  for i in range(len(plan['units'])):
    marker = json.loads((out / token_shards.done_name(i)).read_text())
    for split, shard in marker.items():
      splits[split].append(shard)
  meta = {'format': token_shards.FORMAT, 'tokenizer': tokenizer.identity,
          'dtype': token_shards.dtype_for(tokenizer.vocab_size),
          'source': options.source, 'text_key': options.text_key,
          'eval_fraction': options.eval_fraction, 'piece_chars': options.piece_chars,
          'num_tokens': {s: sum(x['num_tokens'] for x in v) for s, v in splits.items()},
          'num_docs': {s: sum(x['num_docs'] for x in v) for s, v in splits.items()},
          'splits': splits}
  (out / token_shards.META).write_text(json.dumps(meta, indent=1))
  return meta
