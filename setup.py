"""vit_ms: Vision Transformer image classification in MindSpore."""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="vit_ms",
    version="0.1.0",
    description="Vision Transformer (ViT) image classification, natively in MindSpore",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["vit_ms", "vit_ms.*"]),
    # The ImageNet class index used to name predictions; the C++ kernel sources, compiled on first use.
    package_data={"vit_ms": ["*.json"], "vit_ms.ops": ["csrc/*.cc", "csrc/*.h"]},
    install_requires=[
        # Tested with 2.10.0 on CPU; the range admits the MindSpore an Ascend user already installed.
        "mindspore>=2.3,<3",
        # The MindSpore wheels' eager ops fail with SystemError under NumPy 2.
        "numpy>=1.21,<2",
        "download>=0.3.5",
        "pillow>=9.0",
        "safetensors>=0.4",  # reads timm/torchvision .safetensors without PyTorch
        "tqdm>=4.60",  # progress bars for training, eval and verification
        "matplotlib>=3.5",  # training curves, confusion matrix, attention maps
    ],
    # onnx: export.py --file_format ONNX writes the graph with it (opset 17); onnxruntime checks the file.
    # test: references only, never imported by vit_ms: PyTorch for numerical parity, onnx/onnxruntime for
    # ONNX exports, transformers and timm for checkpoint parity (tested with transformers 5.23.0, timm 1.0.31).
    extras_require={"onnx": ["onnx>=1.14", "onnxruntime>=1.16"],
                    "test": ["pytest>=7", "torch==2.13.0", "onnx>=1.14", "onnxruntime>=1.16", "transformers>=4.40",
                             "timm>=1.0"]},
)
