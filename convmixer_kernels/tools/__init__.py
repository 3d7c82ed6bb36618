"""Tools that measure the library: benchmark, tune, profile, info, Triton variant
compile checks. The library never imports this package (``tests/test_package.py``
checks that); ``python -m convmixer_kernels COMMAND`` runs them."""
