"""finetune_trainer: the freeze-and-retrain engine behind FineTuneJob (no Kubernetes imports)."""

__version__ = "0.1.0"
