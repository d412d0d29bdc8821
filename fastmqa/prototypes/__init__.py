"""numba.cuda prototypes of the course's kernels, one module per chapter.

Each module has the kernel written with `numba.cuda.jit` and a runner with the
reference's signature taking and returning torch tensors (float32), so the registry, the
tests and the autograder check prototypes exactly as they check the .cu kernels.
"""
