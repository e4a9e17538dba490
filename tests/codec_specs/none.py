"""none: float32 through the all-gather path, exact (codecs/cast.py)."""
import numpy as np
import torch

from . import CodecSpec
from ._ref import cast_ref_decode

SPEC = CodecSpec(expected_nbytes=lambda bits, options, numels: 4 * sum(numels), cast_dtype=torch.float32,
                 ref_decode=cast_ref_decode(np.float32))
