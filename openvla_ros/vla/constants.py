"""Constants of the public OpenVLA release, each defined once (see shared/docs/openvla-reference.md)."""

IMAGE_SIZE = 224

# Per-backbone normalisation: DINOv2 uses ImageNet statistics, SigLIP a plain 0.5/0.5.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# Area fraction kept by the centre crop that augmentation-trained checkpoints expect.
CENTER_CROP_AREA = 0.9

N_ACTION_BINS = 256

# The released model answers one 7-D end-effector delta per call.
DEFAULT_ACTION_DIM_NAMES = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")

# Control period of the Bridge data the released model was trained on (5 Hz). Checkpoints made by
# this project store their own value in config.json under `control_period_s`.
DEFAULT_CONTROL_PERIOD_S = 0.2

# The SentencePiece word-boundary piece; the reference appends its id after "Out:".
SPACE_PIECE = "\u2581"

PROMPT_STYLE_OPENVLA = "openvla"
PROMPT_STYLE_VICUNA = "vicuna"
VICUNA_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# openvla_ros extensions to config.json (ignored by the reference code, which loads such a
# checkpoint unchanged when the chunk length is 1):
CONFIG_KEY_CHUNK = "action_chunk_len"  # K actions decoded per call (K*D tokens), default 1
CONFIG_KEY_DT = "control_period_s"  # seconds each action covers, default DEFAULT_CONTROL_PERIOD_S
CONFIG_KEY_DIM_NAMES = "action_dim_names"  # names of the D action dimensions
CONFIG_KEY_PROMPT_STYLE = "prompt_style"  # "openvla" or "vicuna"; default derived from the LLM id

# Longest instruction accepted (characters), by vla_node and the /act server: the tokenizer holds the
# GIL while it works, so an unbounded instruction would stall every other thread of the process.
MAX_INSTRUCTION_CHARS = 2000

# Smallest image side (px) the preprocessing accepts (resizing needs at least 2 pixels per axis).
MIN_IMAGE_SIDE = 2

# What --dtype and vla_node's dtype parameter accept; auto picks per model size (vla/loading.py).
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DTYPE_HELP = ("weights dtype; auto (default): float32 for models under 1e9 parameters (tiny/demo), "
              "else bfloat16 (float16 on GPUs without bf16)")
