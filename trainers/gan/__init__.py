"""The GAN task: its step as phases, losses and penalties, augmentation, EMA, collapse diagnostics."""
