"""The VAE task: its step, the objective (likelihoods, KL, schedules) and the optional adversarial term."""
