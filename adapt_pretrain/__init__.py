"""adapt-pretrain: online ADAPT data reweighting for LLM pretraining."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("adapt-pretrain")  # setup.py's version is the single source
except PackageNotFoundError:  # a source tree used without `pip install`
    __version__ = "0+unknown"
