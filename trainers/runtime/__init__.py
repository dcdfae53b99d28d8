"""The runtime every task shares: processes, engines and precision, checkpoints, signals,
non-finite guards, fault injection and the run log."""
