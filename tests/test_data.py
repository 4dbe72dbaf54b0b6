"""Tests of hyperconn_jax.data: builders, tokenizers, the grain pipelines and their checkpoints.

Most tests use the text_files builder on small generated files in which every word of document i
is the tag 'dNNN' (NNN = i), so the document behind any piece of a batch can be read back.
"""

import copy
import glob
import gzip
import hashlib
import json
import os
import pickle
import re
import sys

from etils import epath
import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from configs import base
from hyperconn_jax import data
from hyperconn_jax import paths
from hyperconn_jax.data import builders
from hyperconn_jax.data import iterator_state
from hyperconn_jax.data import pipeline
from hyperconn_jax.data import prepare
from hyperconn_jax.data import sources
from hyperconn_jax.data import token_prepare
from hyperconn_jax.data import token_shards
from hyperconn_jax.data import tokenizers

NUM_DOCS = 30
SEQ_LEN = 32
BATCH = 4
_TAG = re.compile(r'd(\d{3})')


def _doc_text(i: int) -> str:
  # Lengths from about 50 to 1000 bytes; a non-ASCII word checks that bytes are UTF-8.
  return '\n'.join(' '.join([f'd{i:03d}'] * 9) + ' é' for _ in range(1 + (i * 7) % 19)) + '\n'


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """Directory of NUM_DOCS text files; returns (glob, {doc id: text})."""
  root = tmp_path_factory.mktemp('corpus')
  texts = {}
  for i in range(NUM_DOCS):
    texts[i] = _doc_text(i)
    (root / f'doc_{i:03d}.txt').write_text(texts[i], encoding='utf-8')
  return str(root / '*.txt'), texts


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _config(glob_: str, tfds_dir: str, **data_overrides):
  config = base.get_config()
  config.data.dataset = 'text_files'
  config.data.text_glob = glob_
  config.data.data_dir = tfds_dir
  config.data.seq_len = SEQ_LEN
  config.data.eval_fraction = 0.2
  config.data.shuffle_window = 128
  config.train.batch_size = BATCH
  for key, value in data_overrides.items():
    config.data[key] = value
  return config


@pytest.fixture
def config(corpus, data_dir):
  return _config(corpus[0], data_dir)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def _stream(batches) -> np.ndarray:
  """Token stream of consecutive packed rows (seq_len + 1 tokens each: inputs + last target)."""
  rows = [np.concatenate([b['inputs'][r], b['targets'][r, -1:]])
          for b in batches for r in range(len(b['inputs']))]
  return np.concatenate(rows)


def _doc_ids(tokens: np.ndarray) -> list[int]:
  """Tags of the documents in a token stream, in order (split at EOS = 0)."""
  tokenizer = tokenizers.ByteTokenizer()
  ids = []
  for piece in np.split(tokens, np.flatnonzero(tokens == 0) + 1):
    match = _TAG.search(tokenizer.decode(piece))
    if match:
      ids.append(int(match.group(1)))
  return ids


def _tags(batches) -> set[int]:
  """Every document tag that appears in any row of the batches."""
  tokenizer = tokenizers.ByteTokenizer()
  return {int(m) for b in batches for row in b['inputs']
          for m in _TAG.findall(tokenizer.decode(row))}


def _split_ids(config, split: str) -> list[int]:
  """Document ids of a prepared split, in stored order (read through the TFDS data source)."""
  source = sources.data_source(config.data, split)
  return [int(re.fullmatch(r'doc_(\d{3})\.txt', source[i]['path'].decode()).group(1))
          for i in range(len(source))]


# Tokenizers.


def test_bytes_tokenizer_round_trip():
  tokenizer = data.get_tokenizer(base.get_config().data)
  assert tokenizer.vocab_size == 256 and tokenizer.eos_id == 0
  ids = tokenizer.encode('héllo\0 wörld')
  assert ids.dtype == np.int32
  # NUL dropped from the text, EOS (0) appended once.
  assert ids[-1] == 0 and np.count_nonzero(ids == 0) == 1
  np.testing.assert_array_equal(ids[:-1], list('héllo wörld'.encode('utf-8')))
  assert tokenizer.decode(ids) == 'héllo wörld'
  assert tokenizer.encode(b'abc').tolist() == [97, 98, 99, 0]
  assert tokenizer.num_bytes(ids) == len('héllo wörld'.encode('utf-8'))


def test_sentencepiece_tokenizer(corpus, tmp_path):
  sentencepiece = pytest.importorskip('sentencepiece')
  text_file = tmp_path / 'train.txt'
  with open(os.path.join(builders.stdlib_root(), 'os.py'), encoding='utf-8') as f:
    text_file.write_text(f.read() + ''.join(corpus[1].values()), encoding='utf-8')
  sentencepiece.SentencePieceTrainer.train(
      input=str(text_file), model_prefix=str(tmp_path / 'spm'), vocab_size=200,
      character_coverage=1.0, minloglevel=2)
  data_config = base.get_config().data
  data_config.tokenizer = 'sentencepiece'
  data_config.tokenizer_path = str(tmp_path / 'spm.model')
  tokenizer = data.get_tokenizer(data_config)
  assert tokenizer.vocab_size == 200
  text = 'd003 d003 é\nd017'
  ids = tokenizer.encode(text)
  assert ids.dtype == np.int32 and ids[-1] == tokenizer.eos_id
  assert np.count_nonzero(ids == tokenizer.eos_id) == 1
  assert tokenizer.decode(ids) == tokenizer.decode(ids[:-1])
  assert tokenizer.decode(ids).split() == text.split()
  # Every byte of the text, plus at most the space SentencePiece puts in front of the document.
  assert tokenizer.num_bytes(ids) - len(text.encode('utf-8')) in (0, 1)


def test_sentencepiece_errors(monkeypatch, tmp_path):
  data_config = base.get_config().data
  data_config.tokenizer = 'sentencepiece'
  data_config.tokenizer_path = str(tmp_path / 'missing.model')
  with pytest.raises(ValueError, match='data.tokenizer_path.*no such'):
    data.get_tokenizer(data_config)
  monkeypatch.setitem(sys.modules, 'sentencepiece', None)  # import fails as if not installed
  with pytest.raises(ValueError, match='pip install sentencepiece'):
    data.get_tokenizer(data_config)


# Config validation.


@pytest.mark.parametrize('overrides, match', [
    (dict(tokenizer='wordpiece'),
     r"data.tokenizer='wordpiece'.*'bytes', 'sentencepiece', 'huggingface'"),
    (dict(tokenizer='sentencepiece', tokenizer_path=''), r"data.tokenizer_path=''"),
    (dict(seq_len=0), r'data.seq_len=0; expected an int >= 1'),
    (dict(shuffle_seed=2**32), r'data.shuffle_seed=4294967296; expected an int in \[0, '),
    (dict(eval_fraction=0.0), r'data.eval_fraction=0.0'),
    (dict(eval_fraction=1), r'data.eval_fraction=1'),
    (dict(shuffle_seed=-1), r'data.shuffle_seed=-1'),
    (dict(shuffle_window=-2), r'data.shuffle_window=-2'),
    (dict(worker_count=True), r'data.worker_count=True'),
    (dict(dataset=''), r"data.dataset=''"),
    (dict(eval_split=''), r"data.eval_split=''"),
    (dict(text_key=''), r"data.text_key=''"),
    (dict(data_dir=None), r'data.data_dir=None'),
    (dict(text_glob=''), r"data.text_glob=''"),
    (dict(text_glob='/nonexistent/dir/*.txt'), r'data.text_glob=.*matches 0 file'),
    (dict(tokenizer='huggingface'), r"data.tokenizer_path=''"),
    (dict(dataset='tokens', data_dir=''), r"data.data_dir='' but data.dataset='tokens'"),
    (dict(read_threads=0), r'data.read_threads=0; expected an int >= 1'),
    (dict(piece_chars=-1), r'data.piece_chars=-1'),
    (dict(min_eval_tokens=-1), r'data.min_eval_tokens=-1'),
    (dict(crop_min_area=0), r'data.crop_min_area=0'),
    (dict(mixup_alpha=-1.0), r'data.mixup_alpha=-1.0'),
])
def test_validate_rejects(overrides, match, corpus, data_dir):
  config = _config(corpus[0], data_dir, **overrides)
  with pytest.raises(ValueError, match=match):
    data.validate(config.data)


# Builders and preparation.


def test_split_by_path_is_stable_and_disjoint():
  paths = [f'pkg/mod_{i}.py' for i in range(500)]
  splits = builders.split_by_path(paths, 0.05)
  assert set(splits['train']).isdisjoint(splits['validation'])
  assert sorted(splits['train'] + splits['validation']) == sorted(paths)
  assert 5 <= len(splits['validation']) <= 50
  # A function of each path alone: order and the other files do not matter.
  assert builders.split_by_path(paths[::-1], 0.05) == splits
  fewer = builders.split_by_path(paths[:250], 0.05)
  assert set(fewer['validation']) == set(splits['validation']) & set(paths[:250])
  # With two files or more neither split is empty.
  assert all(len(v) == 1 for v in builders.split_by_path(['a', 'b'], 0.01).values())


def test_text_files_train_validation_disjoint_by_file(config, corpus):
  data.ensure_prepared(config)
  train, validation = _split_ids(config, 'train'), _split_ids(config, 'validation')
  assert set(train).isdisjoint(validation)
  assert sorted(train + validation) == list(range(NUM_DOCS))
  assert validation and train == sorted(train)  # stored in path order
  source = sources.data_source(config.data, 'validation')
  assert source[0]['text'].decode('utf-8') == corpus[1][validation[0]]


def test_text_files_config_follows_the_files(tmp_path):
  for i in range(3):
    (tmp_path / f'{i}.txt').write_text(f'text {i}')
  pattern = str(tmp_path / '*.txt')
  name = builders.text_files_config(pattern, 0.2, 100).name
  assert builders.text_files_config(pattern, 0.2, 100).name == name
  assert builders.text_files_config(pattern, 0.3, 100).name != name
  assert builders.text_files_config(pattern, 0.2, 50).name != name
  (tmp_path / '1.txt').write_text('changed, longer text')
  assert builders.text_files_config(pattern, 0.2, 100).name != name


def test_prepare_cli_and_concurrent_preparation(corpus, tmp_path, monkeypatch, capsys):
  config = _config(corpus[0], str(tmp_path / 'tfds'))
  # Another process finishes preparing the same dataset while this one is generating: this one's
  # rename fails and it uses theirs.
  original = builders.TextFiles._split_generators
  raced = []

  def racing(self, dl_manager):
    if not raced:
      raced.append(True)
      sources.prepare(sources.builder(config.data))
    return original(self, dl_manager)

  monkeypatch.setattr(builders.TextFiles, '_split_generators', racing)
  prepare.main(['--dataset=text_files', f'--text_glob={corpus[0]}',
                f'--data_dir={tmp_path / "tfds"}', '--eval_fraction=0.2'], base.get_config())
  assert raced and 'text_files is prepared' in capsys.readouterr().out
  assert sorted(_split_ids(config, 'train') + _split_ids(config, 'validation')) == list(
      range(NUM_DOCS))
  assert not glob.glob(str(tmp_path / 'tfds' / '**' / '*incomplete*'), recursive=True)


@pytest.fixture(scope='module')
def stdlib_config(tmp_path_factory):
  config = base.get_config()
  config.data.data_dir = str(tmp_path_factory.mktemp('stdlib'))
  config.data.seq_len = SEQ_LEN
  config.train.batch_size = BATCH
  data.ensure_prepared(config)  # about a second
  return config


def test_stdlib_corpus(stdlib_config):
  builder = sources.builder(stdlib_config.data)
  assert builder.is_prepared()
  version = '.'.join(map(str, sys.version_info[:3]))
  assert builder.info.metadata['python_version'] == version
  assert f'py{version}' in builder.data_dir
  # Standard TFDS files: readable without our builder class.
  assert len(tfds.builder_from_directory(builder.data_dir).as_data_source('validation')) == len(
      sources.data_source(stdlib_config.data, 'validation'))
  texts = {}
  for split in ('train', 'validation'):
    source = sources.data_source(stdlib_config.data, split)
    examples = [source[i] for i in range(len(source))]
    texts[split] = {e['path'].decode(): e['text'].decode('utf-8') for e in examples}
  train_paths, eval_paths = set(texts['train']), set(texts['validation'])
  assert train_paths.isdisjoint(eval_paths)
  all_paths = builders.list_stdlib_files(builders.stdlib_root())
  assert train_paths | eval_paths == set(all_paths)
  assert 'os.py' in all_paths and not any('site-packages' in p for p in all_paths)
  assert 0.01 < len(eval_paths) / len(all_paths) < 0.06
  with open(os.path.join(builders.stdlib_root(), 'os.py'), encoding='utf-8') as f:
    assert texts['train' if 'os.py' in train_paths else 'validation']['os.py'] == f.read()
  batch = next(data.make_train_iterator(stdlib_config))
  assert batch['inputs'].shape == (BATCH, SEQ_LEN)


# Unprepared and broken datasets.


def test_missing_tfds_dataset_gives_prepare_command(tmp_path):
  config = base.get_config()
  config.data.dataset = 'lm1b'
  config.data.data_dir = str(tmp_path)
  for call in (data.ensure_prepared, data.make_train_iterator):
    with pytest.raises(ValueError) as info:
      call(config)
    message = str(info.value)
    assert "data.dataset='lm1b' is not prepared" in message
    assert f'python prepare.py --dataset=lm1b --data_dir={tmp_path}' in message
    assert f'tfds build lm1b --data_dir={tmp_path} --file_format=array_record' in message
  assert not os.listdir(tmp_path)  # nothing downloaded or created
  config.data.dataset = 'no_such_dataset_xyz'
  with pytest.raises(ValueError, match=r"data.dataset='no_such_dataset_xyz' is not prepared(.|\n)*"
                     r'tfds build no_such_dataset_xyz --data_dir='):
    data.ensure_prepared(config)


class ToyLm(tfds.core.GeneratorBasedBuilder):
  """A TFDS dataset known by name, as lm1b or c4 would be."""

  VERSION = tfds.core.Version('1.0.0')
  code_path = None  # see builders._LocalBuilder

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({'sentence': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(40), 'test': self._generate_examples(8)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {'sentence': f'toy sentence number {i} ' * 3}


class UnregisteredLm(ToyLm, skip_registration=True):
  """A dataset prepared elsewhere (e.g. c4 with TensorFlow): only its files are known here."""


@pytest.mark.parametrize('builder_cls', [ToyLm, UnregisteredLm])
def test_any_prepared_tfds_dataset_by_name(tmp_path, builder_cls):
  builder_cls(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  config = base.get_config()
  config.data.update(dataset=builder_cls.name, data_dir=str(tmp_path), seq_len=SEQ_LEN,
                     text_key='sentence', eval_split='test')
  config.train.batch_size = BATCH
  # Registered builders are used as such; otherwise tfds reads the prepared files alone.
  assert isinstance(sources.builder(config.data), builder_cls) == (builder_cls is ToyLm)
  data.ensure_prepared(config)
  batch = next(data.make_train_iterator(config))
  assert batch['inputs'].shape == (BATCH, SEQ_LEN) and batch['weights'].all()
  assert 'toy sentence number' in tokenizers.ByteTokenizer().decode(batch['inputs'].ravel())
  assert len(list(data.make_eval_iterator(config, num_batches=0))) >= 1
  config.data.eval_split = 'validation'
  with pytest.raises(ValueError, match=r"Split 'validation'.*\['test', 'train'\]"):
    data.make_eval_iterator(config, num_batches=1)
  config.data.update(eval_split='test', text_key='text')
  with pytest.raises(ValueError, match=r"data.text_key='text'.*\['sentence'\]"):
    data.make_eval_iterator(config, num_batches=1)


def test_bad_text_files(tmp_path):
  (tmp_path / 'a.txt').write_text('fine')
  (tmp_path / 'b.txt').write_bytes(b'caf\xe9 latin-1')
  with pytest.raises(ValueError, match=r'b.txt .*is not UTF-8'):
    data.ensure_prepared(_config(str(tmp_path / '*.txt'), str(tmp_path / 'tfds')))
  (tmp_path / 'b.txt').write_text('')
  (tmp_path / 'a.txt').write_text('')
  with pytest.raises(ValueError, match=r'all 2 matched files are empty'):
    data.ensure_prepared(_config(str(tmp_path / '*.txt'), str(tmp_path / 'tfds')))


def test_dataset_shorter_than_one_sequence(tmp_path):
  for i in range(4):
    (tmp_path / f'{i}.txt').write_text('tiny')
  config = _config(str(tmp_path / '*.txt'), str(tmp_path / 'tfds'), seq_len=64)
  with pytest.raises(ValueError, match=r'only \d+ tokens, fewer than one training sequence'):
    data.make_train_iterator(config)


def test_corrupted_prepared_files(corpus, tmp_path):
  config = _config(corpus[0], str(tmp_path))
  data.ensure_prepared(config)
  (shard,) = glob.glob(str(tmp_path / '**' / '*-train.array_record-*'), recursive=True)
  with open(shard, 'r+b') as f:
    f.truncate(100)
  with pytest.raises(ValueError, match=r'look corrupted: delete'):
    data.make_train_iterator(config)


def test_batch_size_must_divide_over_processes(config):
  config.train.batch_size = 3
  with pytest.raises(ValueError, match=r'train.batch_size=3.*not divisible by the 2 processes'):
    data.make_train_iterator(config, process_index=0, process_count=2)
  config.model.vocab_size = 100
  config.train.batch_size = 4
  with pytest.raises(ValueError, match=r'model.vocab_size=100'):
    data.make_train_iterator(config)


# The train pipeline.


def test_train_batches_are_packed_without_padding(config, corpus):
  config.data.shuffle_window = 0  # rows then follow the token stream in order
  batches = _take(data.make_train_iterator(config), 25)
  for batch in batches:
    assert batch['inputs'].shape == batch['targets'].shape == (BATCH, SEQ_LEN)
    assert batch['inputs'].dtype == batch['targets'].dtype == np.int32
    assert batch['weights'].dtype == np.float32 and batch['weights'].all()
    np.testing.assert_array_equal(batch['targets'][:, :-1], batch['inputs'][:, 1:])
  # The rows are the documents, each followed by EOS, concatenated without a token lost or added.
  stream = _stream(batches)
  ids = _doc_ids(stream)
  tokenizer = tokenizers.ByteTokenizer()
  expected = np.concatenate([tokenizer.encode(corpus[1][i]) for i in ids])
  np.testing.assert_array_equal(stream, expected[:len(stream)])


def test_epochs_cover_train_split_in_different_orders(config):
  config.data.shuffle_window = 0
  train = _split_ids(config, 'train')
  ids = _doc_ids(_stream(_take(data.make_train_iterator(config), 250)))
  first, second = ids[:len(train)], ids[len(train):2 * len(train)]
  assert sorted(first) == sorted(second) == train
  assert first != second and first != train


def test_same_seed_same_batches(config):
  a = _take(data.make_train_iterator(config), 6)
  _assert_same_batches(a, _take(data.make_train_iterator(config), 6))
  config.data.shuffle_seed = 1
  b = _take(data.make_train_iterator(config), 6)
  assert not all(np.array_equal(x['inputs'], y['inputs']) for x, y in zip(a, b))


@pytest.mark.parametrize('shuffle_window', [0, 128])
@pytest.mark.parametrize('through_json', [False, True])
def test_iterator_state_round_trip(config, shuffle_window, through_json):
  config.data.shuffle_window = shuffle_window
  for k in (1, 7, 100):  # mid-document, mid-window, past a window and an epoch
    iterator = data.make_train_iterator(config)
    _take(iterator, k)
    state = iterator.get_state()
    if through_json:  # what grain's checkpoint handler writes
      state = json.loads(json.dumps(state))
    expected = _take(iterator, 5)
    restored = data.make_train_iterator(config)
    restored.set_state(state)
    _assert_same_batches(_take(restored, 5), expected)


def test_iterator_state_round_trip_through_orbax(config, tmp_path):
  iterator = data.make_train_iterator(config)
  _take(iterator, 9)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.save(9, args=ocp.args.Composite(data=iterator_state.Save(iterator)))
    manager.wait_until_finished()
  expected = _take(iterator, 5)
  restored = data.make_train_iterator(config)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.restore(9, args=ocp.args.Composite(data=iterator_state.Restore(restored)))
  _assert_same_batches(_take(restored, 5), expected)


def test_processes_read_disjoint_documents(config):
  train = set(_split_ids(config, 'train'))
  seen = []
  for process_index in range(2):
    iterator = data.make_train_iterator(config, process_index=process_index, process_count=2)
    batches = _take(iterator, 150)
    assert all(b['inputs'].shape == (BATCH // 2, SEQ_LEN) for b in batches)
    seen.append(_tags(batches))
  assert seen[0].isdisjoint(seen[1])
  # Together they cover what a single process reading the global batch sees: every document.
  assert seen[0] | seen[1] == train == _tags(_take(data.make_train_iterator(config), 100))


def test_fixed_shards_give_the_same_global_batches_on_any_process_count(config):
  config.data.num_shards = 2
  whole = _take(data.make_train_iterator(config), 6)
  parts = [_take(data.make_train_iterator(config, process_index=p, process_count=2), 6)
           for p in range(2)]
  for batch, a, b in zip(whole, *parts):
    for key in batch:
      np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), batch[key])
  # The shards hold disjoint documents: rows [0, 2) come from shard 0, rows [2, 4) from shard 1.
  assert _tags(parts[0]).isdisjoint(_tags(parts[1]))
  # Two shards read by one process resume exactly, through JSON (as checkpoints store the state).
  iterator = data.make_train_iterator(config)
  _take(iterator, 3)
  state = json.loads(json.dumps(iterator.get_state()))
  restored = data.make_train_iterator(config)
  restored.set_state(state)
  _assert_same_batches(_take(restored, 3), whole[3:])


def test_shards_must_fit_processes_and_batch(config):
  config.data.num_shards = 3
  with pytest.raises(ValueError, match=r'data.num_shards=3 must be a multiple of the 2 processes'):
    data.make_train_iterator(config, process_index=0, process_count=2)
  with pytest.raises(ValueError, match=r'train.batch_size=4 must be divisible by data.num_shards=3'):
    data.make_train_iterator(config)
  config.data.num_shards = -1
  with pytest.raises(ValueError, match=r'data.num_shards=-1; expected an int >= 0'):
    data.validate(config.data)


def _save_states(directory, iterators) -> None:
  """The files iterator_state.Save writes when len(iterators) processes save (one each)."""
  os.makedirs(directory, exist_ok=True)
  for p, iterator in enumerate(iterators):
    with open(os.path.join(directory, f'process_{p}-of-{len(iterators)}.json'), 'w') as f:
      json.dump(iterator.get_state(), f)


def test_resume_on_another_process_count_with_fixed_shards(config, tmp_path):
  config.data.num_shards = 4
  handler = iterator_state.Handler()
  # Saved by 2 processes after 5 batches, resumed by 1 (this test's process count).
  parts = [data.make_train_iterator(config, process_index=p, process_count=2) for p in range(2)]
  for part in parts:
    _take(part, 5)
  _save_states(tmp_path / 'two', parts)
  resumed = data.make_train_iterator(config)
  assert iterator_state.restorable(tmp_path / 'two', resumed)
  handler.restore(epath.Path(tmp_path / 'two'), item=resumed)
  for batch, a, b in zip(_take(resumed, 4), *[_take(part, 4) for part in parts]):
    for key in batch:
      np.testing.assert_array_equal(batch[key], np.concatenate([a[key], b[key]]))
  # Saved by 1 process, resumed by 2: each takes its shards from the whole state.
  whole = data.make_train_iterator(config)
  _take(whole, 3)
  state = json.loads(json.dumps(whole.get_state()))
  expected = _take(whole, 4)
  parts = [data.make_train_iterator(config, process_index=p, process_count=2) for p in range(2)]
  for part in parts:
    part.set_state(state)
  for batch, a, b in zip(expected, *[_take(part, 4) for part in parts]):
    for key in batch:
      np.testing.assert_array_equal(batch[key], np.concatenate([a[key], b[key]]))
  # Other shards (data.num_shards changed, or 0: one per process) cannot be resumed.
  config.data.num_shards = 2
  assert not iterator_state.restorable(tmp_path / 'two', data.make_train_iterator(config))
  config.data.num_shards = 0
  zero = [data.make_train_iterator(config, process_index=p, process_count=2) for p in range(2)]
  _save_states(tmp_path / 'zero', zero)
  assert not iterator_state.restorable(tmp_path / 'zero', data.make_train_iterator(config))


# The eval pipeline.


def test_eval_is_deterministic_and_complete(config, corpus):
  batches = list(data.make_eval_iterator(config, num_batches=0))
  _assert_same_batches(batches, list(data.make_eval_iterator(config, num_batches=0)))
  _assert_same_batches(batches[:2], list(data.make_eval_iterator(config, num_batches=2)))
  for batch in batches[:-1]:
    assert batch['weights'].all()
  last = batches[-1]
  assert last['inputs'].shape == (BATCH, SEQ_LEN) and not last['weights'].all()
  # The weighted targets are exactly the validation documents in stored order, minus the first
  # token of each packed row (it is only an input).
  validation = _split_ids(config, 'validation')
  tokenizer = tokenizers.ByteTokenizer()
  stream = np.concatenate([tokenizer.encode(corpus[1][i]) for i in validation])
  rows = [stream[i:i + SEQ_LEN + 1] for i in range(0, len(stream), SEQ_LEN + 1)]
  expected = np.concatenate([row[1:] for row in rows])
  targets = np.concatenate([b['targets'][b['weights'] > 0] for b in batches])
  np.testing.assert_array_equal(targets, expected)
  assert _tags(batches) == set(validation)
  assert _tags(batches).isdisjoint(_split_ids(config, 'train'))


def test_eval_sharded_by_rows(config):
  whole = list(data.make_eval_iterator(config, num_batches=0))
  parts = [list(data.make_eval_iterator(config, process_index=p, process_count=2, num_batches=0))
           for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(whole)
  for batch, a, b in zip(whole, *parts):
    for key in batch:
      np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), batch[key])


@pytest.fixture(scope='module')
def token_config(corpus, tmp_path_factory):
  """The corpus prepared as byte-level token shards (one shard per file: validation documents lie
  in many shards), with half the documents held out."""
  out = tmp_path_factory.mktemp('eval_tokens')
  prepare.main([f'--source={corpus[0]}', f'--out={out}', '--eval_fraction=0.5', '--workers=1'],
               base.get_config())
  return _config('', str(out), dataset='tokens')


def _eval_by_stream(config, process_index, process_count, batch_size, num_batches):
  """The eval batches as every process read them before token shards were read by row: the
  whole stream concatenated and split (grain's ConcatThenSplit), this process's rows kept."""
  local = batch_size // process_count
  ds = pipeline._documents(config, config.data.eval_split).to_iter_dataset()
  ds = grain.experimental.ConcatThenSplitIterDataset(
      ds, length_struct={'tokens': config.data.seq_len + 1})
  ds = ds.map(pipeline._ToExample()).batch(
      batch_size, drop_remainder=False,
      batch_fn=pipeline._PadAndShard(batch_size, process_index, local))
  return list(ds)[:num_batches] if num_batches > 0 else list(ds)


@pytest.mark.parametrize('num_batches', [0, 2])
def test_eval_from_token_shards_reads_only_the_processes_rows(token_config, monkeypatch,
                                                               num_batches):
  config, batch_size = token_config, 8
  meta = token_shards.read_meta(config.data.data_dir)
  shards = [s['name'] for s in meta['splits']['validation'] if s['num_docs']]
  assert len(shards) > 4
  reads = []
  original = token_shards._Shard.read

  def counted(shard, start, stop):
    reads.append(stop - start)
    return original(shard, start, stop)

  monkeypatch.setattr(token_shards._Shard, 'read', counted)
  monkeypatch.setattr(token_shards._Shard, '__getitem__', None)  # no whole documents
  whole = list(data.make_eval_iterator(config, num_batches=num_batches, batch_size=batch_size))
  monkeypatch.undo()
  expected = _eval_by_stream(config, 0, 1, batch_size, num_batches)
  _assert_same_batches(whole, expected)
  assert all(b[k].dtype == e[k].dtype for b, e in zip(whole, expected) for k in b)
  assert len(whole) == (num_batches or len(expected))
  if not num_batches:  # the whole split: its last batch ends in padding rows
    assert not whole[-1]['weights'][-1].any()
  for count in (2, 4):
    parts, read = [], []
    for p in range(count):
      reads.clear()
      monkeypatch.setattr(token_shards._Shard, 'read', counted)
      parts.append(list(data.make_eval_iterator(config, process_index=p, process_count=count,
                                                num_batches=num_batches,
                                                batch_size=batch_size)))
      monkeypatch.undo()
      read.append(sum(reads))
      # Its own rows' tokens, no more: the weighted targets plus each row's first token.
      assert read[p] == sum(int((b['weights'].sum(1) > 0).sum() + b['weights'].sum())
                            for b in parts[p])
    assert [len(part) for part in parts] == [len(whole)] * count
    for batch, *pieces in zip(whole, *parts):
      for key in batch:
        np.testing.assert_array_equal(np.concatenate([x[key] for x in pieces]), batch[key])
    if not num_batches:
      assert sum(read) == meta['num_tokens']['validation']  # each token read once in all


def test_eval_from_token_shards_in_a_bucket(token_config, gcs_bucket):
  # Ranged reads of the .tokens objects (gcsfs) give the batches of the local memory map.
  local = list(data.make_eval_iterator(token_config, process_index=1, process_count=2,
                                       num_batches=0, batch_size=8))
  config = copy.deepcopy(token_config)
  config.data.data_dir = f'{gcs_bucket}/eval_tokens'
  paths.copy_tree(epath.Path(token_config.data.data_dir), epath.Path(config.data.data_dir))
  _assert_same_batches(list(data.make_eval_iterator(config, process_index=1, process_count=2,
                                                    num_batches=0, batch_size=8)), local)


def test_worker_processes_give_the_same_batches(config):
  expected = _take(data.make_train_iterator(config), 12)
  config.data.worker_count = 1
  iterator = data.make_train_iterator(config)
  try:
    _assert_same_batches(_take(iterator, 5), expected[:5])
    state = json.loads(json.dumps(iterator.get_state()))
  finally:
    iterator.close()
  restored = data.make_train_iterator(config)
  try:
    restored.set_state(state)
    _assert_same_batches(_take(restored, 7), expected[5:])
  finally:
    restored.close()


# Token shards, HF tokenizers, splits by document and the eval-size check.


def _train_hf_tokenizer(path, special_tokens=('<|endoftext|>',)) -> str:
  """A byte-level BPE tokenizer.json (GPT-2 / GPT-NeoX style) of about 320 ids, trained on the
  test documents."""
  import tokenizers as hf  # pylint: disable=g-import-not-at-top
  tok = hf.Tokenizer(hf.models.BPE())
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  trainer = hf.trainers.BpeTrainer(vocab_size=320, special_tokens=list(special_tokens),
                                   initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([_doc_text(i) for i in range(NUM_DOCS)], trainer)
  tok.save(str(path))
  return str(path)


@pytest.fixture(scope='module')
def hf_path(tmp_path_factory):
  return _train_hf_tokenizer(tmp_path_factory.mktemp('hf') / 'tokenizer.json')


def _hf_data_config(hf_path: str):
  data_config = base.get_config().data
  data_config.update(tokenizer='huggingface', tokenizer_path=hf_path)
  return data_config


def test_huggingface_tokenizer(hf_path, tmp_path):
  tokenizer = data.get_tokenizer(_hf_data_config(hf_path))
  assert 257 < tokenizer.vocab_size <= 320  # 256 byte ids, EOS, merges
  text = _doc_text(3) + 'naïve ✓ unseen words\n'
  ids = tokenizer.encode(text)
  assert ids.dtype == np.int32 and ids[-1] == tokenizer.eos_id
  assert len(ids) < len(text.encode('utf-8')) / 1.5  # merges were learned
  assert tokenizer.decode(ids[:-1]) == text
  # Bytes per id (byte-level alphabet), for bits per byte: exact, EOS counts 0.
  assert tokenizer.num_bytes(ids) == len(text.encode('utf-8'))
  assert tokenizer.identity['sha256'] == hashlib.sha256(open(hf_path, 'rb').read()).hexdigest()
  assert [list(x) for x in tokenizer.encode_batch([text, 'é'])] == [
      list(ids), list(tokenizer.encode('é'))]
  no_eos = _train_hf_tokenizer(tmp_path / 'no_eos.json', special_tokens=('<pad>',))
  with pytest.raises(ValueError, match=r"none of the end-of-document tokens.*\['<pad>'\]"):
    data.get_tokenizer(_hf_data_config(no_eos))
  with pytest.raises(ValueError, match=r'data.tokenizer_path=.*no such huggingface model file'):
    data.get_tokenizer(_hf_data_config(str(tmp_path / 'missing.json')))


def test_split_pieces():
  text = ''.join(f'line {i}\n' for i in range(100))
  pieces = builders.split_pieces(text, 50)
  assert ''.join(pieces) == text and all(len(p) <= 50 for p in pieces)
  assert all(p.endswith('\n') for p in pieces)  # cut after line breaks
  assert builders.split_pieces('x' * 120, 50) == ['x' * 50, 'x' * 50, 'x' * 20]
  assert builders.split_pieces(text, 0) == [text]


def test_single_text_file_is_split_by_pieces(tmp_path):
  book = ''.join(f'line {i}: ' + 'word ' * (i % 13) + '\n' for i in range(2000))
  (tmp_path / 'book.txt').write_text(book)
  config = _config(str(tmp_path / 'book.txt'), str(tmp_path / 'tfds'), piece_chars=1000,
                   eval_fraction=0.1)
  data.validate(config.data)
  data.ensure_prepared(config)
  texts = {split: [x['text'].decode() for x in sources.data_source(config.data, split)]
           for split in ('train', 'validation')}
  assert 5 <= len(texts['validation']) and len(texts['train']) > 3 * len(texts['validation'])
  assert sorted(texts['train'] + texts['validation']) == sorted(
      builders.split_pieces(book, 1000))
  # Adding a file does not move the pieces of the other.
  (tmp_path / 'more.txt').write_text('another file\n' * 300)
  config.data.text_glob = str(tmp_path / '*.txt')
  data.ensure_prepared(config)
  validation = [x['text'].decode() for x in sources.data_source(config.data, 'validation')
                if x['path'] == b'book.txt']
  assert validation == texts['validation']


def test_tiny_eval_split_is_an_error_before_training(corpus, tmp_path):
  config = _config(corpus[0], str(tmp_path))
  data.ensure_prepared(config)  # default: at least one batch, 4 x 32 tokens
  config.data.min_eval_tokens = 10**6
  with pytest.raises(ValueError, match=(
      r"eval split 'validation' .* has \d+ tokens, fewer than data.min_eval_tokens=1000000 .*"
      r'data.eval_fraction.*data.piece_chars.*lower data.min_eval_tokens')):
    data.ensure_prepared(config)


def _write_sources(root) -> dict[str, str]:
  """Documents of every source format under root; returns {document key: text}."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  os.makedirs(root / 'sub', exist_ok=True)
  docs = {}
  with open(root / 'a.jsonl', 'w') as f:
    for k, i in enumerate(range(0, 10)):
      f.write(json.dumps({'text': _doc_text(i), 'id': i}) + '\n')
      docs[f'a.jsonl#{k}'] = _doc_text(i)
  with gzip.open(root / 'sub' / 'b.jsonl.gz', 'wt') as f:
    for k, i in enumerate(range(10, 20)):
      f.write(json.dumps({'text': _doc_text(i)}) + '\n')
      docs[f'sub/b.jsonl.gz#{k}'] = _doc_text(i)
  texts = [_doc_text(i) for i in range(20, 30)]
  pq.write_table(pa.table({'text': texts, 'n': list(range(10))}), root / 'c.parquet',
                 row_group_size=4)
  docs.update({f'c.parquet#{k}': t for k, t in enumerate(texts)})
  book = ''.join(_doc_text(i) for i in range(30, 40))
  (root / 'd.txt').write_text(book)
  docs.update({f'd.txt#{k}': t for k, t in enumerate(builders.split_pieces(book, 600))})
  return docs


def _shard_texts(out, tokenizer, split) -> list[str]:
  meta = token_shards.read_meta(out)
  source = token_shards.TokenSource(out, meta, split)
  texts = []
  for i in range(len(source)):
    tokens = source[i]['tokens']
    assert tokens[-1] == tokenizer.eos_id and (tokens[:-1] != tokenizer.eos_id).all()
    texts.append(tokenizer.decode(tokens[:-1]))
  return texts


def test_prepare_token_shards_and_train_on_them(hf_path, tmp_path, capsys):
  docs = _write_sources(tmp_path / 'src')
  out = tmp_path / 'tokens'
  prepare.main([f'--source={tmp_path}/src/**/*.*', f'--out={out}', '--tokenizer=huggingface',
                f'--tokenizer_path={hf_path}', '--eval_fraction=0.25', '--piece_chars=600',
                '--workers=2'], base.get_config())
  assert '--config.data.dataset=tokens' in capsys.readouterr().out
  tokenizer = data.get_tokenizer(_hf_data_config(hf_path))
  meta = token_shards.read_meta(out)
  assert meta['tokenizer'] == tokenizer.identity and meta['dtype'] == 'uint16'
  # Every document once, in validation exactly when its key hashes below eval_fraction.
  for split in ('train', 'validation'):
    want = sorted(t for k, t in docs.items()
                  if builders.in_validation(k, 0.25) == (split == 'validation'))
    assert sorted(_shard_texts(out, tokenizer, split)) == want
    assert meta['num_docs'][split] == len(want)
  source = token_shards.TokenSource(out, meta, 'train')
  source[0]  # opened here; grain worker processes get a copy that opens its own
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(source))[5]['tokens'],
                                source[5]['tokens'])

  config = _config('', str(out), dataset='tokens', tokenizer='huggingface', tokenizer_path=hf_path)
  config.model.vocab_size = 512
  data.validate(config.data)
  data.ensure_prepared(config)
  batches = _take(data.make_train_iterator(config), 30)
  assert batches[0]['inputs'].shape == (BATCH, SEQ_LEN) and all(b['weights'].all() for b in batches)
  train_text = tokenizer.decode(_stream(batches))
  assert _TAG.search(train_text)
  eval_batches = list(data.make_eval_iterator(config, num_batches=0))
  eval_tokens = sum(b['weights'].sum() for b in eval_batches)
  num_tokens = meta['num_tokens']['validation']
  rows = -(-num_tokens // (SEQ_LEN + 1))
  assert eval_tokens == num_tokens - rows  # every token, as a target unless first of its row

  # Shards made with another tokenizer are refused before anything is read or compiled.
  config.data.update(tokenizer='bytes', tokenizer_path='')
  config.model.vocab_size = 256
  with pytest.raises(ValueError, match=r"made with the tokenizer .*'huggingface'.*"
                     r"data.tokenizer='bytes'"):
    data.ensure_prepared(config)
  config.data.data_dir = str(tmp_path / 'nothing')
  with pytest.raises(ValueError, match=r'holds no finished token shards.*\n.*prepare.py --source='):
    data.ensure_prepared(config)


def _tree(directory) -> dict[str, bytes]:
  return {os.path.relpath(p, directory): open(p, 'rb').read()
          for p in glob.glob(os.path.join(directory, '*'))}


def test_prepare_resumes_after_interruption(tmp_path, monkeypatch):
  for i in range(5):
    (tmp_path / f'{i}.txt').write_text(_doc_text(i) * 3)
  args = [f'--source={tmp_path}/*.txt', '--piece_chars=300', '--workers=1']
  prepare.main(args + [f'--out={tmp_path}/clean'], base.get_config())
  written = []
  original = token_prepare.write_marker

  def interrupted(out, index, marker):
    if len(written) == 2:
      raise KeyboardInterrupt  # killed while tokenizing unit 2: its shards are written, no marker
    written.append(index)
    original(out, index, marker)

  monkeypatch.setattr(token_prepare, 'write_marker', interrupted)
  with pytest.raises(KeyboardInterrupt):
    prepare.main(args + [f'--out={tmp_path}/resumed'], base.get_config())
  assert not os.path.exists(tmp_path / 'resumed' / token_shards.META)
  monkeypatch.setattr(token_prepare, 'write_marker', original)
  done = {name: os.path.getmtime(tmp_path / 'resumed' / token_shards.done_name(i))
          for i, name in enumerate(written)}
  prepare.main(args + [f'--out={tmp_path}/resumed'], base.get_config())
  assert _tree(tmp_path / 'resumed') == _tree(tmp_path / 'clean')
  assert done == {name: os.path.getmtime(tmp_path / 'resumed' / token_shards.done_name(i))
                  for i, name in enumerate(written)}  # finished units were not redone
  with pytest.raises(ValueError, match=r'holds a preparation of another source'):
    prepare.main([f'--source={tmp_path}/[0-3].txt', f'--out={tmp_path}/resumed'],
                 base.get_config())


def test_prepare_from_a_tfds_dataset(tmp_path):
  tfds_dir = str(tmp_path / 'tfds')
  ToyLm(data_dir=tfds_dir, file_format='array_record').download_and_prepare()
  out = str(tmp_path / 'tokens')
  args = ['--source=tfds:toy_lm', f'--tfds_data_dir={tfds_dir}', '--tfds_splits=train,test',
          '--text_key=sentence', '--workers=1']
  prepare.main(args + [f'--out={out}'], base.get_config())
  tokenizer = tokenizers.ByteTokenizer()
  source = tfds.builder('toy_lm', data_dir=tfds_dir).as_data_source('train')
  assert _shard_texts(out, tokenizer, 'train') == [  # in the dataset's stored order
      source[i]['sentence'].decode() for i in range(40)]
  assert len(_shard_texts(out, tokenizer, 'validation')) == 8
  # The same dataset prepared as TFRecord needs TensorFlow (not installed here).
  (info,) = glob.glob(os.path.join(tfds_dir, 'toy_lm', '*', 'dataset_info.json'))
  with open(info) as f:
    content = json.load(f)
  content['fileFormat'] = 'tfrecord'
  with open(info, 'w') as f:
    json.dump(content, f)
  with pytest.raises(ValueError, match=r'prepared as tfrecord.*pip install tensorflow.*\n.*'
                     r'tfds build toy_lm --data_dir=DIR --file_format=array_record'):
    prepare.main(args + [f'--out={tmp_path}/tokens2'], base.get_config())
