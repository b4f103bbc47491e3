"""adapt-pretrain: online ADAPT data reweighting for LLM pretraining."""
__version__ = "0.1.0"
