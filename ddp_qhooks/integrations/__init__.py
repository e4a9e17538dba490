"""Integrations, thin on top of the engine: DDP (``register``, the comm hook), LocalSGD / DiLoCo,
Lightning, Accelerate, and joining the process group under torchrun or SLURM (``launch``)."""
