"""Prints libcublasLt.so.N and cublasLt.h paths from pip's nvidia-* wheels (PyTorch brings them)."""
import glob
import os
import site

roots = site.getsitepackages() + [site.getusersitepackages()]
for r in roots:
    for pat in ("nvidia/*/lib/libcublasLt.so.1[1-9]", "nvidia/*/include/cublasLt.h"):
        for f in sorted(glob.glob(os.path.join(r, pat))):
            print(f)
