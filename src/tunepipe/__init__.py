"""tunepipe: one YAML file and one command from a base model and data to an evaluated, reported
fine-tune (SFT, then DPO)."""

__version__ = "0.1.0"
