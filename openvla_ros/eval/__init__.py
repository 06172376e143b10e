"""Open-loop evaluation of engines on rosbag2 recordings (no ROS imports).

`bags` reads and synchronises frames, `bag_writer` writes bags, `metrics` scores predictions,
`report` writes CSV/JSON/Markdown with plots, `open_loop` runs an engine over bags.
"""
