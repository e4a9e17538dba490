"""Local SGD / DiLoCo with quantized outer synchronization, drift correction, partial participation
and overlapped rounds (:class:`LocalSGD`)."""
from .core import LocalSGD, OUTER_OPTIMIZERS, _split, local_phase_hook
from .drift import DRIFTS, SCAFFOLD_OPTIONS

__all__ = ["LocalSGD", "local_phase_hook", "OUTER_OPTIMIZERS", "DRIFTS", "SCAFFOLD_OPTIONS"]
