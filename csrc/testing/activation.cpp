// The production CPU activations (csrc/cpu/activation.cpp), compiled into _C_testing as
// well, for the test ops _cpu_activation and _cpu_fma_chains (same source, same flags: the
// same code as in _C). A file of its own so that its object does not share a path with _C's.
#include "../cpu/activation.cpp"
