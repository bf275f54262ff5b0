"""autowu: the AutoWU learning-rate scheduler (Kim et al., 2021) with DeepSpeed and FFCV.

Version ranges here are what a GPU user can satisfy; ``constraints.txt`` pins the versions tested on CPU.
"""
from setuptools import find_packages, setup

setup(
    name="autowu",
    version="0.1.0",
    description="Automated learning-rate warmup for large-batch training (AutoWU), with DeepSpeed and FFCV",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["autowu", "autowu.*"]),
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",  # timm needs it
        "deepspeed>=0.14,<0.20",
        "ffcv>=1.0.2,<1.1",
        "timm>=0.9",
        "gpytorch>=1.11",
        "numba>=0.57",
        "numpy>=1.24",
        "opencv-python>=4.5",
        "pillow>=9",
        "tqdm>=4.60",
        "matplotlib>=3.6",
        "tensorboard>=2.12",
        "scikit-learn>=1.2",  # the embedded digits dataset of the default run
    ],
    extras_require={
        "dev": ["pytest>=7"],
        # FFCV's GPU NormalizeImage imports cupy; pick the wheel of your CUDA major version.
        "gpu": ["cupy-cuda12x>=12"],
    },
)
