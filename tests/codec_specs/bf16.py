"""bf16: cast to bfloat16 (codecs/cast.py)."""
import torch

from . import CodecSpec
from ._ref import cast_ref_decode

SPEC = CodecSpec(expected_nbytes=lambda bits, options, numels: 2 * sum(numels), cast_dtype=torch.bfloat16,
                 ref_decode=cast_ref_decode(None))
