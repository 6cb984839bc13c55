"""Cloud and shadow masks: SCL labels, the SegFormer model, its training and inference."""

import os

# On a busy machine (tile servers, tests, other jobs) torch's OpenMP threads spin-waiting for
# each other made a training step 10x slower than with one thread; passive waiting keeps two
# threads a win. Only a default: an explicit OMP_WAIT_POLICY wins, and it only takes effect
# if torch is not imported yet.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
