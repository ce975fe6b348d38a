"""Weights in and out: safetensors/pickles, PyTorch<->Flax conversion, diffusers folders, single-file
checkpoints, the CLIP tokenizer."""
