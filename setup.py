"""autowu: the AutoWU learning-rate scheduler (Kim et al., 2021) with DeepSpeed and FFCV.

Version ranges here are what a GPU user can satisfy; ``constraints.txt`` pins the versions tested on CPU.
"""
import subprocess

from setuptools import Extension, find_packages, setup


def opencv_flags():
    """Compiler and linker flags of OpenCV 4 from pkg-config (installed by scripts/setup.sh for FFCV)."""
    for package in ("opencv4", "opencv"):
        try:
            out = subprocess.run(["pkg-config", "--cflags", "--libs", package], capture_output=True, text=True,
                                 check=True).stdout.split()
        except (OSError, subprocess.CalledProcessError):
            continue
        return ([f[2:] for f in out if f.startswith("-I")], [f[2:] for f in out if f.startswith("-L")],
                [f[2:] for f in out if f in ("-lopencv_core", "-lopencv_imgproc")])
    return [], [], ["opencv_core", "opencv_imgproc"]


include_dirs, library_dirs, libraries = opencv_flags()
# Optional: without it (no OpenCV headers) the loaders fall back to FFCV's own resize, only slower.
fast_resize = Extension("autowu.data._fast_resize", sources=["autowu/data/_fast_resize.cpp"], language="c++",
                        include_dirs=include_dirs, library_dirs=library_dirs, libraries=libraries,
                        extra_compile_args=["-O3", "-std=c++11"], optional=True)

setup(
    name="autowu",
    version="0.1.0",
    description="Automated learning-rate warmup for large-batch training (AutoWU), with DeepSpeed and FFCV",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["autowu", "autowu.*"]),
    ext_modules=[fast_resize],
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",  # timm needs it
        # 0.19.2 is the first that casts only parameters to fp16 (engine._cast_module_mixed_precision);
        # before it, module.half() made BatchNorm's running statistics fp16 (SyncBatchNorm: inf, then NaN).
        "deepspeed>=0.19.2,<0.20",
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
