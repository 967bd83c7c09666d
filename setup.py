import re
from pathlib import Path

from setuptools import find_packages, setup

# Read, not imported: building the package must not need its dependencies.
VERSION = re.search(r'__version__ = "([^"]+)"', (Path(__file__).parent / "edge_agent" / "__init__.py").read_text())[1]

# Bounds: the combination verified together on this project's machine (see README, "Versions").
AGENT = [                      # `pip install .`: the agent daemon, its client and the package contract
    "numpy>=2.0,<2.5",
    "onnxruntime>=1.20,<1.33",
    "pyzmq>=26,<28",
    "msgpack>=1.0,<1.3",
    "prometheus_client>=0.20,<0.27",
    "cryptography>=42,<49",     # Ed25519 package signatures (edge_agent/package/signing.py); 48.0.0 verified
    "onnx>=1.17,<1.24",         # the agent runs a package's two graphs as one (edge_agent/package/runtime.py)
]
TRAINER = [                    # ingestion, training, ONNX export (and the benchmark's comparisons)
    "pandas>=2.2,<3.2",
    "pyarrow>=15,<27",
    "scikit-learn>=1.6,<1.10",
    "skl2onnx>=1.18,<1.21",
    "numba>=0.60,<0.69",
]
COLLECTOR = [                  # the fleet report's plots
    "matplotlib>=3.8,<3.12",
]
TEST = ["pytest>=8,<10", "Semi-ATE-STDF>=0.1", "hypothesis>=6.100,<7"]

setup(
    name="edge-inference",
    version=VERSION,
    description="Edge inference runtime for semiconductor test: trainer, ONNX model registry, edge agent, benchmark",
    packages=find_packages(include=["trainer", "trainer.*", "edge_agent", "edge_agent.*", "bench", "bench.*"]),
    package_data={"edge_agent": ["wire/*.md", "collector/*.md", "daemon/deploy/*"]},
    python_requires=">=3.11",
    install_requires=AGENT,
    extras_require={
        "trainer": TRAINER,
        "collector": COLLECTOR,
        "all": TRAINER + COLLECTOR,
        "test": TEST,
    },
    entry_points={
        "console_scripts": [
            "edge-train=trainer.cli:main",
            "edge-agent=edge_agent.daemon.cli:main",
            "edge-replay=trainer.replay:main",
            "edge-collector=edge_agent.collector.cli:main",
            "edge-bench=bench.cli:main",
        ]
    },
)
