"""Builds narvl and its native extension narvl._C (C++ CPU kernels; CUDA sources only where a
CUDA toolkit and a CUDA build of torch exist). Build without isolation so the installed torch is
used: ``pip install --no-build-isolation -e .``."""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
cflags = ["-O3", "-fopenmp", "-Wno-psabi"]
use_cuda = bool(cu) and torch.version.cuda is not None and CUDA_HOME is not None
Ext = CUDAExtension if use_cuda else CppExtension
ext = Ext(
    "narvl._C",
    cpp + (cu if use_cuda else []),
    include_dirs=[os.path.join(ROOT, "csrc")],
    extra_compile_args={"cxx": cflags, "nvcc": ["-O3"]} if use_cuda else {"cxx": cflags},
    extra_link_args=["-fopenmp"],
)

setup(
    name="narvl",
    version="0.1.0",
    description="Fast kernels (C++ CPU, Triton GPU) and models for NARVL",
    packages=find_packages(include=["narvl", "narvl.*"]) + ["narvl.kernels"],
    package_dir={"narvl.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    # tested with torch 2.13.0 (CPU) and 2.11.0+cu130 (GPU); older versions are not tested
    # transformers: eP-ALM's frozen OPT and ViT (narvl.models.epalm; its cache and attention
    # APIs need 4.56, tested with 4.57.6 on torch 2.13)
    install_requires=["torch>=2.11", "numpy", "pillow", "safetensors", "tokenizers", "tqdm",
                      "transformers>=4.56,<4.58"],
    extras_require={
        # the OFA oracle (tests/ofa_oracle.py): the OFA team's PyTorch port inside modelscope
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "triton", "numpy", "modelscope==1.40.2",
                 "onnx", "onnxscript", "onnxruntime", "matplotlib>=3.7"],
        # train.py's loss curve (OUT/curve.png)
        "plot": ["matplotlib>=3.7"],
        # narvl.models.export_onnx and the ONNX Runtime peer of bench/bench_serving.py
        "serving": ["onnx", "onnxscript", "onnxruntime"],
        "oracle": ["modelscope==1.40.2"],
        "triton": ["triton"],
        "kenlm": ["kenlm"],
        "bench": ["pytest-benchmark", "flashlight-text", "pyctcdecode"],
    },
)
