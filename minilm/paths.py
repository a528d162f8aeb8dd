"""Paths as records keep them: relative to the working directory (the repository root when the lab
runs from it) when they lie inside it, so a record reads the same on any clone."""
from __future__ import annotations

import os


def portable(path: str, root: str | None = None) -> str:
  """`path` relative to `root` (default: the working directory) when it lies inside it ('.' for
  root itself), else its normalized absolute form."""
  root = os.path.abspath(root or os.getcwd())
  full = os.path.abspath(path)
  if full == root or full.startswith(root.rstrip(os.sep) + os.sep):
    return os.path.relpath(full, root)
  return full


def portable_tree(obj, root: str | None = None):
  """A JSON-like tree with every string that is an absolute path inside `root` made relative."""
  if isinstance(obj, dict):
    return {k: portable_tree(v, root) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(portable_tree(v, root) for v in obj)
  if isinstance(obj, str) and os.path.isabs(obj) and "\n" not in obj:
    rel = portable(obj, root)
    return rel if not os.path.isabs(rel) else obj
  return obj
