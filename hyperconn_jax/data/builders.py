"""TFDS builders for the corpora that need no download: the Python standard library and text files.

Both are ordinary `tfds.core.GeneratorBasedBuilder`s. tensorflow-datasets 4.9.10 prepares them to
array_record without TensorFlow (checked: `download_and_prepare(file_format='array_record')` writes
the shards, `dataset_info.json` and `features.json` with only numpy / array_record installed), and
they are read back with `builder.as_data_source(split)`, the call behind `tfds.data_source`.

A document is a file ('stdlib': every file whole). 'text_files' cuts a file longer than
data.piece_chars characters at line breaks into pieces of at most that size (`split_pieces`), so
that one huge file still gives a validation split; each example is {'text': the file or piece,
'path': the file's path relative to the corpus root}. Train and validation are split by document
(piece), by a stable hash of its key (the relative path, '#' and the piece number for text_files;
`eval_fraction` of the documents go to validation), so the split never depends on the file order,
the other files, the machine or the Python hash seed. Examples are stored in path order (TFDS
shuffling disabled); training shuffles them itself.

What is prepared is part of the builder config name, so a different corpus never reuses stale
shards: `python_stdlib/py3.11.7-eval0.03` records the interpreter version (the standard library
differs slightly between patch versions), `text_files/<hash>` hashes the glob, the eval fraction
and the name, size and modification time of every matched file.
"""

import dataclasses
import glob as glob_lib
import hashlib
import os
import sys
import sysconfig

import tensorflow_datasets as tfds

# Directories under the standard library that are not part of it (third-party packages) or hold
# no source.
_NOT_STDLIB = frozenset({'site-packages', 'dist-packages', '__pycache__'})


def _features() -> tfds.features.FeaturesDict:
  """One example per file: its text and its path relative to the corpus root."""
  return tfds.features.FeaturesDict({'text': tfds.features.Text(), 'path': tfds.features.Text()})


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder that downloads nothing.

  TFDS locates a builder's download checksums next to its code with `importlib_resources`, a
  package it only requires on Python < 3.9, so preparing a builder defined in a package fails on a
  newer Python without it; with no code path there are no checksums to look for.

  Subclasses set DESCRIPTION and `_metadata()` (what the builder config records) for the default
  `_info`, one example per local file (`_features`), or override `_info`.
  """

  code_path = None
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  DESCRIPTION = ''

  def _metadata(self) -> dict:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION, features=_features(),
        disable_shuffling=True, metadata=tfds.core.MetadataDict(**self._metadata()))


def stdlib_root() -> str:
  """Returns the directory of the running interpreter's standard library."""
  return sysconfig.get_paths()['stdlib']


def python_version() -> str:
  """Returns the running interpreter's version, e.g. '3.11.7'."""
  return '.'.join(str(v) for v in sys.version_info[:3])


def list_stdlib_files(root: str) -> list[str]:
  """Returns the relative paths of every *.py file under root, sorted, third-party dirs excluded."""
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _NOT_STDLIB)
    for name in filenames:
      if name.endswith('.py'):
        paths.append(os.path.relpath(os.path.join(dirpath, name), root))
  return sorted(paths)


def glob_root(pattern: str) -> str:
  """Returns the longest leading directory of an (absolute) glob pattern that has no wildcard."""
  parts = pattern.split(os.sep)
  fixed = []
  for part in parts[:-1]:
    if glob_lib.has_magic(part):
      break
    fixed.append(part)
  return os.sep.join(fixed) or os.sep


def expand_glob(pattern: str) -> tuple[str, list[str]]:
  """Expands a text_files glob ('**' recurses).

  Args:
    pattern: the glob, absolute or relative to the working directory; '~' is expanded.

  Returns:
    (root, relative paths): the glob's fixed leading directory and the sorted paths of the
    matched regular files relative to it.
  """
  pattern = os.path.abspath(os.path.expanduser(pattern))
  root = glob_root(pattern)
  files = [p for p in glob_lib.glob(pattern, recursive=True) if os.path.isfile(p)]
  return root, sorted(os.path.relpath(p, root) for p in files)


def _path_hash(rel_path: str) -> float:
  """Maps a relative path to [0, 1) with a hash that is stable across machines and runs."""
  digest = hashlib.sha1(rel_path.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2.0**64


def in_validation(key: str, eval_fraction: float) -> bool:
  """Whether the document with this key (e.g. 'file.jsonl#17') is held out for validation."""
  return _path_hash(key) < eval_fraction


def split_pieces(text: str, piece_chars: int) -> list[str]:
  """Cuts text into pieces of at most piece_chars characters, after a line break where there is one
  (else in mid-line); piece_chars <= 0 or a shorter text: [text]. ''.join(pieces) == text."""
  if piece_chars <= 0 or len(text) <= piece_chars:
    return [text]
  pieces, start = [], 0
  while start < len(text):
    end = start + piece_chars
    if end < len(text):
      line_break = text.rfind('\n', start, end)
      end = line_break + 1 if line_break >= start else end
    pieces.append(text[start:end])
    start = end
  return pieces


def split_by_path(rel_paths: list[str], eval_fraction: float) -> dict[str, list[str]]:
  """Assigns documents to 'train' / 'validation' by a stable hash of their key (relative path).

  A document goes to validation when its hash is below eval_fraction. With two or more, neither
  split is left empty: the one with the smallest hash goes to validation if none did (the largest
  to train if all did), which is still a function of the keys alone.

  Args:
    rel_paths: distinct relative paths.
    eval_fraction: expected fraction of files in validation, in (0, 1).

  Returns:
    {'train': sorted paths, 'validation': sorted paths}, disjoint, covering rel_paths.
  """
  by_hash = sorted(rel_paths, key=_path_hash)
  num_eval = sum(_path_hash(p) < eval_fraction for p in by_hash)
  if len(by_hash) >= 2:
    num_eval = min(max(num_eval, 1), len(by_hash) - 1)
  return {'train': sorted(by_hash[num_eval:]), 'validation': sorted(by_hash[:num_eval])}


def _format_fraction(fraction: float) -> str:
  return f'{fraction:g}'


@dataclasses.dataclass(eq=False)
class StdlibConfig(tfds.core.BuilderConfig):
  """Which standard library and how it is split.

  Attributes:
    root: the standard library directory.
    eval_fraction: fraction of files in validation.
  """
  root: str = ''
  eval_fraction: float = 0.03


def stdlib_config(eval_fraction: float) -> StdlibConfig:
  """Returns the config of the running interpreter's standard library corpus."""
  return StdlibConfig(
      name=f'py{python_version()}-eval{_format_fraction(eval_fraction)}', root=stdlib_root(),
      eval_fraction=eval_fraction,
      description=f'*.py files of the Python {python_version()} standard library, {stdlib_root()}.')


class PythonStdlib(_LocalBuilder):
  """The source files of the running interpreter's standard library, one example per file."""

  DESCRIPTION = 'Python standard library sources, byte-level language modelling corpus.'

  def _metadata(self) -> dict:
    config = self.builder_config
    return dict(python_version=python_version(), root=config.root,
                eval_fraction=config.eval_fraction)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    splits = split_by_path(list_stdlib_files(self.builder_config.root),
                           self.builder_config.eval_fraction)
    return {name: self._generate_examples(paths) for name, paths in splits.items()}

  def _generate_examples(self, rel_paths):
    root = self.builder_config.root
    for rel in rel_paths:
      with open(os.path.join(root, rel), 'rb') as f:
        # A handful of test files are deliberately not UTF-8 (PEP 263 encoding tests).
        text = f.read().decode('utf-8', errors='replace')
      yield rel, {'text': text, 'path': rel}


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
  """Which text files and how they are split.

  Attributes:
    text_glob: the user's glob, made absolute.
    eval_fraction: fraction of documents (pieces) in validation.
    piece_chars: files longer than this are cut into pieces (split_pieces); 0: never.
  """
  text_glob: str = ''
  eval_fraction: float = 0.03
  piece_chars: int = 0


def text_files_config(text_glob: str, eval_fraction: float, piece_chars: int) -> TextFilesConfig:
  """Returns the config of the files matched by text_glob as they are now (see module docstring).

  Raises:
    ValueError: the glob matches no file.
  """
  pattern = os.path.abspath(os.path.expanduser(text_glob))
  root, rel_paths = expand_glob(pattern)
  if not rel_paths:
    raise ValueError(f'data.text_glob={text_glob!r} matches no file.')
  fingerprint = hashlib.sha1()
  fingerprint.update(f'{pattern}\0{_format_fraction(eval_fraction)}\0{piece_chars}\0'.encode())
  for rel in rel_paths:
    st = os.stat(os.path.join(root, rel))
    fingerprint.update(f'{rel}\0{st.st_size}\0{st.st_mtime_ns}\0'.encode())
  return TextFilesConfig(
      name='g' + fingerprint.hexdigest()[:16], text_glob=pattern, eval_fraction=eval_fraction,
      piece_chars=piece_chars, description=f'{len(rel_paths)} files matching {pattern}.')


def read_text_file(path: str, what: str) -> str:
  """The UTF-8 text of a file; ValueError naming the file and `what` matched it if it is not."""
  with open(path, 'rb') as f:
    data = f.read()
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(f'{path} (matched by {what}) is not UTF-8 text: {e}. Convert it to UTF-8 or '
                     'exclude it from the glob.') from None


class TextFiles(_LocalBuilder):
  """The user's own UTF-8 text files (data.text_glob), one example per file or piece of a file."""

  DESCRIPTION = 'Text files matched by a glob.'

  def _metadata(self) -> dict:
    config = self.builder_config
    return dict(text_glob=config.text_glob, eval_fraction=config.eval_fraction,
                piece_chars=config.piece_chars)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    root, rel_paths = expand_glob(config.text_glob)
    pieces = {}  # key -> (relative path, piece number)
    for rel in rel_paths:
      text = read_text_file(os.path.join(root, rel), 'data.text_glob')
      for k, piece in enumerate(split_pieces(text, config.piece_chars)):
        if piece:
          pieces[f'{rel}#{k}'] = (rel, k)
    if not pieces:
      raise ValueError(
          f'data.text_glob={config.text_glob!r}: all {len(rel_paths)} matched files are empty.')
    splits = split_by_path(list(pieces), config.eval_fraction)
    return {name: self._generate_examples(root, sorted(pieces[key] for key in keys))
            for name, keys in splits.items()}

  def _generate_examples(self, root, rel_pieces):
    texts = {}
    for rel, k in rel_pieces:
      if rel not in texts:
        texts.clear()  # Pieces come in path order: one file at a time in memory.
        texts[rel] = split_pieces(read_text_file(os.path.join(root, rel), 'data.text_glob'),
                                  self.builder_config.piece_chars)
      yield f'{rel}#{k}', {'text': texts[rel][k], 'path': rel}
