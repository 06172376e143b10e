"""The OpenVLA model without ROS: checkpoint reading, backbones, prompt, preprocessing, action tokens."""
