"""Numba's threading layer: Intel TBB from the virtualenv.

Cold 256 px tiles in-process on the 2-core VM (40 tiles, median): 47 ms with TBB, 75 ms with GNU
OpenMP (numba's pick when TBB cannot load), 52 ms with workqueue (which must not be entered by
two server threads at once). pip's ``tbb`` wheel installs libtbb.so.12 into <prefix>/lib, where
the dynamic loader does not look: loading it by path first lets numba's TBB pool link to it.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def preload_tbb() -> bool:
    """Make libtbb loadable for numba (before its first parallel kernel). True if found."""
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        lib = Path(prefix) / "lib" / "libtbb.so.12"
        if lib.exists():
            try:
                ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
            except OSError as exc:
                log.warning("could not load %s (%s): numba falls back to OpenMP", lib, exc)
                return False
            return True
    return False
