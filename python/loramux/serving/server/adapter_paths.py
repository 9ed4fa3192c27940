"""Where an adapter named over HTTP may be read from: a path resolved inside the adapter root, with
no `..` and no symbolic link (the folder's or a file's inside it) leading out of the root."""

from __future__ import annotations

import os
from typing import Optional

from loramux.serving.server.errors import AdapterNotFoundError, AdapterPathError

#: how many entries of an adapter folder are checked for links out of the root before giving up
MAX_FOLDER_ENTRIES = 10_000


def resolve_inside_root(root: Optional[str], path: str) -> str:
    """The real path of `path` (relative to `root`, or absolute) if it and every file under it stay
    inside `root`; raises AdapterPathError naming the path otherwise. Without a root, runtime
    loading is refused: the operator opts in with --adapter-root."""
    if root is None:
        raise AdapterPathError("loading adapters at run time is disabled: start the server with --adapter-root DIR "
                               "and give paths inside it")
    if not isinstance(path, str) or not path or "\x00" in path:
        raise AdapterPathError(f"lora_path must be a non-empty path, got {path!r}")
    real_root = os.path.realpath(root)
    candidate = path if os.path.isabs(path) else os.path.join(real_root, path)
    real = os.path.realpath(candidate)  # resolves `..` and every symbolic link on the way
    if not _inside(real_root, real):
        raise AdapterPathError(f"lora_path {path!r} resolves to {real}, outside the adapter root {real_root}")
    if not os.path.isdir(real):
        raise AdapterNotFoundError(f"lora_path {path!r}: no adapter folder at {real} (inside the adapter root)")
    seen = 0
    for folder, dirs, files in os.walk(real):
        for name in dirs + files:
            seen += 1
            if seen > MAX_FOLDER_ENTRIES:
                raise AdapterPathError(f"lora_path {path!r}: more than {MAX_FOLDER_ENTRIES} entries; "
                                       "not an adapter folder")
            target = os.path.realpath(os.path.join(folder, name))
            if not _inside(real_root, target):
                raise AdapterPathError(f"lora_path {path!r}: {os.path.join(folder, name)} links to {target}, outside "
                                       f"the adapter root {real_root}")
    return real


def _inside(root: str, path: str) -> bool:
    return path == root or os.path.commonpath([root, path]) == root


__all__ = ["resolve_inside_root", "MAX_FOLDER_ENTRIES"]
