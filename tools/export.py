"""Write a training checkpoint's EMA weights alone, in float16, with its metadata: the file sample.py loads by
default (how assets/student.safetensors is made). Sampling loads the weights into float32 parameters again.

    python tools/export.py out/camgeo/ckpt.safetensors assets/student.safetensors
"""
import argparse
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules, one up

import training  # noqa: E402


def export_ema(checkpoint, destination, dtype=torch.float16):
    """checkpoint's "ema.*" tensors cast to dtype, and its metadata, written atomically to destination."""
    with safe_open(checkpoint, framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key).to(dtype) for key in f.keys() if key.startswith("ema.")}
    os.makedirs(os.path.dirname(destination) or ".", exist_ok=True)
    training.atomic_write(destination, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a ckpt.safetensors that train.py wrote")
    parser.add_argument("destination")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.checkpoint):
        raise SystemExit(f"tools/export.py: {args.checkpoint} not found")
    export_ema(args.checkpoint, args.destination)
    print(f"{args.checkpoint} -> {args.destination} (EMA weights, float16)")


if __name__ == "__main__":
    main()
