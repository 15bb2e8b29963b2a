"""Builds torch_apex4._C: the CPU kernels always, the CUDA kernels when this
torch has CUDA and nvcc is found. Install with
`pip install --no-build-isolation -e .` (the extension links against the torch
already installed)."""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def extension():
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    # No FMA contraction: the same fp32 results on every x86 SIMD level.
    cxx = ["-O3", "-std=c++17", "-ffp-contract=off"]
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if os.environ.get("APEX4_FORCE_CPU") == "1":
        with_cuda = False
    if not with_cuda:
        return CppExtension("torch_apex4._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx})
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
    return CUDAExtension("torch_apex4._C", sources + sorted(glob.glob("csrc/cuda/*.cu")),
                         include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc})


setup(
    name="torch_apex4",
    version="0.1.0",
    description="Pure W4A4 (4-bit weights and activations) LLM inference for PyTorch",
    packages=find_packages(include=["torch_apex4", "torch_apex4.*"]),
    package_data={"torch_apex4": ["data/*.txt"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"torch_dynamo_backends": ["apex4 = torch_apex4.backend:apex4_backend"]},
)
