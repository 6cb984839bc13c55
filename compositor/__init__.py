"""ClearSky: on-demand cloud-free Sentinel-2 composites."""

from compositor.threads import preload_tbb

preload_tbb()  # before any numba kernel starts its threads
