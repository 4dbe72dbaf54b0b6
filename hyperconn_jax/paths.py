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
