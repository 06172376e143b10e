"""Fine-tuning OpenVLA-format checkpoints on recorded demonstrations (no ROS).

data: episodes from rosbag2 bags and ACT/DexVLA-style HDF5, cached as training shards.
stats: action statistics in the official `dataset_statistics.json` schema, normalisation types.
collate: samples -> input ids / labels / pixel values, token-exact with the inference engine.
objective: the multimodal forward and the action-token loss.
trainer: LoRA / full fine-tuning, DDP via torchrun, validation, resume, merged checkpoint export.
"""
