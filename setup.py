"""ament_python build script for openvla_ros (also installable with pip: `pip install -e .`)."""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "openvla_ros"

# Each ROS node is also a console script so `ros2 run openvla_ros <node>` and launch files find it.
NODE_SCRIPTS = [
    "vla_node = openvla_ros.nodes.vla_node:main",
    "ik_node = openvla_ros.nodes.ik_node:main",
    "sim_node = openvla_ros.nodes.sim_node:main",
    "bag_player = openvla_ros.nodes.bag_player:main",
    "recorder = openvla_ros.nodes.recorder:main",
]

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
        (f"share/{PACKAGE}/config/robots", glob("config/robots/*.yaml")),
    ],
    python_requires=">=3.10",
    # Core dependencies only. rclpy and the message packages come from the ROS distro on a robot
    # (colcon build); on machines without one, install the `ros-wheels` extra.
    install_requires=[
        "numpy",
        "pyyaml",
        "pillow",
        "torch",
        "safetensors",
        "accelerate",
        "tokenizers",
        "transformers",
        "timm",
        "tqdm",
    ],
    extras_require={
        "ros-wheels": [
            "ros-rclpy",
            "ros-rmw-fastrtps-cpp",
            "ros-sensor-msgs",
            "ros-geometry-msgs",
            "ros-std-msgs",
            "ros-std-srvs",
            "ros-trajectory-msgs",
            "ros-diagnostic-msgs",
        ],
        "sim": ["pybullet", "pin"],
        "eval": ["rosbags", "matplotlib"],
        "train": ["peft", "accelerate", "h5py", "pyarrow", "av", "tfrecord", "tensorboard"],
        # LeRobot datasets (parquet + mp4) and RLDS tfrecords, without TensorFlow
        "data": ["pyarrow", "av", "tfrecord"],
        "onnx": ["onnx", "onnxscript", "onnxruntime"],
        "quant": ["bitsandbytes", "torchao"],
        "test": ["pytest", "pytest-timeout"],
    },
    zip_safe=True,
    maintainer="openvla_ros maintainers",
    maintainer_email="maintainers@openvla-ros.invalid",
    description="OpenVLA on ROS 2: engines, async action-chunk buffer, IK, bag evaluation, fine-tuning",
    license="MIT",
    entry_points={
        "console_scripts": ["openvla-ros = openvla_ros.cli:main"] + NODE_SCRIPTS,
    },
)
