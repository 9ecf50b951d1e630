"""ppo-rlhf: the InstructGPT loop (SFT -> reward model -> PPO) in small readable pieces."""

__version__ = "0.1.0"
