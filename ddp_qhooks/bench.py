"""``python -m ddp_qhooks.bench``: the bandwidth benchmark, kept at its documented name (the code is in
:mod:`ddp_qhooks.tools.bench`)."""
from .tools.bench import main

if __name__ == "__main__":
    main()
