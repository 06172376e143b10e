"""Dataset and bag I/O shared by evaluation, training and the nodes (no ROS, no torch).

- `msgtypes`: message types from the definitions a bag stores (any lab's own types, ROS 1 bags)
  and from ``.msg`` text, for reading and writing bags.
- `lerobot`: LeRobotDataset v3.0 (and v2.1) reading and writing: parquet frames, mp4 videos.
- `rlds`: RLDS / Open X-Embodiment episodes from TFDS tfrecord files, without TensorFlow.
- `images`: the one place that decodes encoded images (JPEG/PNG bytes) to RGB.
"""
