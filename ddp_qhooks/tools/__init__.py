"""Tools around the library: the bandwidth benchmark (``bench``; also ``python -m ddp_qhooks.bench``),
the convergence study, the soak test, the codec micro-benchmark and fidelity tables, the emulated
slow link (``netsim``) and the offline data sets they use.  Nothing in the library imports them."""
