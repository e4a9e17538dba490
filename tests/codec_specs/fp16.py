"""fp16: cast to IEEE half (codecs/cast.py)."""
import numpy as np
import torch

from . import CodecSpec
from ._ref import cast_ref_decode

SPEC = CodecSpec(expected_nbytes=lambda bits, options, numels: 2 * sum(numels), cast_dtype=torch.float16,
                 ref_decode=cast_ref_decode(np.float16))
