"""Training: the Trainer subclass and what keeps a run safe and honest: checks before the first step, which
parameters train, complete checkpoints and resuming, reruns, preemption, timing, and image reliance."""
