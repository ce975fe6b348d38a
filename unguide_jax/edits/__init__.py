"""Edits of the base model: the Edit pytree every eraser produces, LoRA, the on-disk adapter format,
PEFT/kohya/merged exports, and loading edits from any source."""
