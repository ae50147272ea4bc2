"""tinyrwkv: a readable NumPy RWKV-7 (x070) you can learn from, run and test against.

    import tinyrwkv
    model = tinyrwkv.load("model.pth")            # .pth, .safetensors, .gguf or an HF folder
    logits, state = model.forward([1, 2, 3])
    trace = tinyrwkv.trace(model, [1, 2, 3])      # every intermediate by name (tinyrwkv.oracle)
    for piece in tinyrwkv.generate(model, "Once upon a time", max_tokens=50):
        print(piece, end="")
    tinyrwkv.save_state(state, "s.npz"); state = tinyrwkv.load_state("s.npz", model.config)
    model = tinyrwkv.load()                       # the small story model shipped in weights/
    loss, grads = tinyrwkv.train.loss_and_grad(tinyrwkv.read_checkpoint("model.pth"), ids, targets)
"""

from . import oracle, train  # tinyrwkv.oracle.compare, tinyrwkv.train.loss_and_grad
from .errors import CheckpointError, UnsupportedCheckpoint
from .formats import read_checkpoint
from .formats.state_file import load_state, save_state
from .generate import Session, generate
from .loader import load
from .model import RWKV7, STEPS, BatchState, Config, State, Steps
from .oracle import trace
from .sampling import SamplingParams, sample_logits
from .tokenizer import HFTokenizer, TokenizerError, WorldTokenizer, get_tokenizer

__version__ = "0.1.0"

__all__ = [
    "load", "read_checkpoint", "RWKV7", "Config", "State", "BatchState", "WorldTokenizer", "HFTokenizer",
    "get_tokenizer", "generate", "Session", "SamplingParams", "sample_logits",
    "CheckpointError", "UnsupportedCheckpoint", "TokenizerError", "train", "oracle", "trace",
    "Steps", "STEPS", "save_state", "load_state",
]
