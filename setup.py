from setuptools import find_packages, setup

from trainer import __version__

setup(
    name="edge-inference",
    version=__version__,
    description="Edge inference runtime for semiconductor test: trainer, ONNX model registry, edge agent, benchmark",
    packages=find_packages(include=["trainer", "trainer.*", "edge_agent", "edge_agent.*", "bench", "bench.*"]),
    python_requires=">=3.10",
    # Bounds: the combination verified together on this project's machine (see README, "Versions").
    install_requires=[
        "numpy>=2.0,<2.5",
        "pandas>=2.2,<3.2",
        "pyarrow>=15,<27",
        "scikit-learn>=1.6,<1.10",
        "onnx>=1.17,<1.24",
        "skl2onnx>=1.18,<1.21",
        "onnxruntime>=1.20,<1.33",
        "pyzmq>=26,<28",
        "msgpack>=1.0,<1.3",
        "numba>=0.60,<0.69",
        "prometheus_client>=0.20,<0.27",
        "matplotlib>=3.8,<3.12",
    ],
    extras_require={
        "test": ["pytest>=8,<10", "Semi-ATE-STDF>=0.1"],
    },
    entry_points={
        "console_scripts": [
            "edge-train=trainer.cli:main",
            "edge-agent=edge_agent.cli:main",
            "edge-replay=edge_agent.replay:main",
            "edge-collector=edge_agent.collector.cli:main",
            "edge-bench=bench.cli:main",
        ]
    },
)
