"""Paths: every directory or file the library takes is a local path or an etils.epath URL
(gs://bucket/dir, ...); these two functions are the only place that tells them apart."""

import os

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
  """True for a URL (gs://, s3://, ...): an object store, not a local file system."""
  return '://' in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
  """`path` as an epath.Path: URLs unchanged, local paths with ~ expanded and made absolute."""
  if is_remote(path):
    return epath.Path(path)
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def files_under(directory: epath.Path) -> list[epath.Path]:
  """Every file below `directory` (recursively), sorted; epath's glob refuses '**' on buckets."""
  def bare(path) -> str:  # gcsfs's walk gives 'bucket/dir', without the 'gs://'.
    return os.fspath(path).split('://', 1)[-1].rstrip('/')
  top = bare(directory)
  found = []
  for root, _, names in directory.walk():
    relative = os.path.relpath(bare(root), top)
    found += [directory / name if relative == '.' else directory / relative / name
              for name in names]
  return sorted(found)


def copy_tree(source: epath.Path, target: epath.Path, *, last=lambda path: False) -> None:
  """Copies every file below `source` to the same place below `target` (buckets included; the
  files for which `last(path)` holds are copied after all others)."""
  for path in sorted(files_under(source), key=last):
    destination = target / path.relative_to(source)
    destination.parent.mkdir(parents=True, exist_ok=True)
    path.copy(destination, overwrite=True)
