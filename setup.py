from setuptools import setup

setup(
    name="guided-diffusion",
    version="0.1.0",
    description="A faithful, tested PyTorch reimplementation of OpenAI's ADM (guided-diffusion).",
    packages=["guided_diffusion", "evaluations"],
    python_requires=">=3.10",
    # torch is pinned in the install commands (README, .ci/run) to the CPU wheel; any >= 2.1 works.
    install_requires=["torch>=2.1", "numpy", "blobfile>=1.0.5", "tqdm", "pillow", "scipy"],
    extras_require={
        "mpi": ["mpi4py", "mpich"],
        "plot": ["matplotlib"],  # scripts/sampler_table.py's FID-against-NFE plot
        "latent": ["diffusers"],  # --latent_vae: a pretrained AutoencoderKL (latent.py)
        "diffusers": ["diffusers"],  # scripts/to_diffusers.py, from_diffusers.py (diffusers_bridge)
        # CI runs the latent and plot tests, and the layers contract (import-linter)
        "dev": ["pytest", "mpi4py", "mpich", "diffusers", "matplotlib", "import-linter"],
    },
)
