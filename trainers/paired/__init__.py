"""Paired image-to-image training: pix2pix translation and ESRGAN-style super-resolution (task.py),
one task kind ("paired") behind the Task contract, with its adversarial objectives (losses.py)."""
