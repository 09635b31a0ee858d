"""farm: a Ray-distributed compression farm for tiny LLMs on CPUs."""

__version__ = "0.1.0"
