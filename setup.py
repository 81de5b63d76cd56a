from setuptools import find_packages, setup

# torch and triton are optional: the numpy backend (train, generate, chat, fine-tune, export)
# runs on any OS without them. Triton ships no macOS or Windows wheels.
GPU = ["torch>=2.4", "triton>=3.6"]

setup(
    name="scratchgpt",
    version="0.1.0",
    description="A GPT engine from the ground up: NumPy autograd, Triton kernels, the GPT-2 model and its fine-tuning",
    python_requires=">=3.10",
    packages=find_packages(include=["engine*", "kernels*", "model*", "bench*"]),
    install_requires=[
        "numpy>=1.24",
        "tiktoken>=0.7",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "threadpoolctl>=3.1",
    ],
    extras_require={
        "gpu": GPU,  # the triton backend, the kernel benches
        "ddp": ["torch>=2.4"],  # torch.distributed under torchrun
        "tensorboard": ["tensorboard>=2.14", "torch>=2.4"],  # model.train --tensorboard
        "test": GPU + ["pytest>=8", "pytest-benchmark>=4", "ruff>=0.5", "transformers>=4.56", "tensorboard>=2.14"],
    },
    entry_points={"console_scripts": ["scratchgpt = model.cli:main"]},
)
