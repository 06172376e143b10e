"""Control core (no ROS): chunk buffer, rotations, inference worker, kinematics."""
