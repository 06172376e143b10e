"""Simulated Panda workcell (pybullet) and scripted expert for the reach-cube task; no ROS imports."""
