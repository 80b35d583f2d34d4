"""Hand-written kernels XLA lacks, as XLA FFI custom calls (see each module)."""
