"""openvla_ros: the OpenVLA vision-language-action model on ROS 2 robot arms.

Subpackages: `vla` (model, checkpoint, prompt, preprocessing, action tokens), `engines` (inference
backends), `control` (chunk buffer, kinematics), `sim` (pybullet arm), `eval` (bag metrics),
`training` (fine-tuning), `nodes` (thin rclpy adapters). Only `nodes` imports rclpy.
"""

__version__ = "0.1.0"
