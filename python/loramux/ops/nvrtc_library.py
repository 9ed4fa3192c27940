"""Finds libnvrtc (the torch wheel's nvidia packages, CUDA_HOME, /usr/local/cuda) and loads it
with RTLD_GLOBAL so the Rust core's dynamic loader finds it by soname."""

from __future__ import annotations

import ctypes
import glob
import os
import site
import sys
from typing import List, Optional

__all__ = ["nvrtc_library"]

_nvrtc_handle: Optional[ctypes.CDLL] = None


def _nvrtc_candidates() -> List[str]:
    """libnvrtc files, most specific first: the torch wheel's nvidia packages, then a toolkit."""
    roots = list(sys.path)
    try:
        roots += site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:  # virtualenvs without site.getsitepackages
        pass
    found = []
    for root in roots:
        if not root or not os.path.isdir(os.path.join(root, "nvidia")):
            continue
        for pattern in ("nvidia/cu13/lib/libnvrtc.so.1*", "nvidia/cuda_nvrtc/lib/libnvrtc.so.1*"):
            found += sorted(glob.glob(os.path.join(root, pattern)))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            found += sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")))
    found += sorted(glob.glob("/usr/local/cuda/lib64/libnvrtc.so*"))
    # libnvrtc.so.13 / .so.12 are the sonames; skip the builtins and alias libraries
    return [p for p in dict.fromkeys(found) if "builtins" not in p and "alt" not in os.path.basename(p)]


def nvrtc_library() -> Optional[str]:
    """Loads libnvrtc globally (so the Rust core finds it by soname); returns its path, or None."""
    global _nvrtc_handle
    if _nvrtc_handle is not None:
        return _nvrtc_handle._name
    for path in _nvrtc_candidates():
        try:
            _nvrtc_handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return path
        except OSError:
            continue
    return None
