from setuptools import find_packages, setup

setup(
    name="rearec",
    version="0.1.0",
    description="ReaRec (Think Before Recommend): latent multi-step reasoning for sequential "
    "recommendation, with Triton kernels for serving and a PyTorch training stack.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["rearec", "rearec.*", "rearec_kernels", "rearec_kernels.*"]),
    install_requires=[
        # Pin torch yourself on CPU-only machines (pip install torch==2.13.0): an unpinned torch
        # pulls a multi-GB CUDA build.
        "torch>=2.4",
        "triton>=3.6; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "numpy",
        "safetensors>=0.4",
        "tqdm",
        "matplotlib",
        "pandas",
        "pyarrow",  # Parquet logs
    ],
    extras_require={
        # numpy<2.4: Triton 3.6's interpreter (TRITON_INTERPRET=1) breaks on newer numpy.
        # colorlog, colorama, texttable, tensorboard: what RecBole 1.2.1 (installed --no-deps) needs to
        # import its BERT4Rec for the backbone parity test (skipped without them).
        # pytest-xdist: .ci/run spreads the test modules over one worker per CPU.
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis", "numpy<2.4", "colorlog", "colorama",
                 "texttable", "tensorboard"],
        "bench": ["faiss-cpu"],
    },
    entry_points={"console_scripts": ["rearec=rearec.cli:run_and_exit"]},
)
