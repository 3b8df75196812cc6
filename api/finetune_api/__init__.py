"""The FineTuneJob API (finetune.dev/v1alpha1), shared by the trainer and the operator.

The spec and status models, the progress event a trainer pushes, phases, reasons and condition types,
and the exit codes. It imports neither torch nor kopf nor kubernetes (a test proves it): the operator
image has no torch, the trainer image no kubernetes client, and both must agree on every field here.
"""
