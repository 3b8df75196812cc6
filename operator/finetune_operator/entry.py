"""For `kopf run -m finetune_operator.entry [-A | -n NS] [--liveness URL]`.

Importing this module registers the handlers on kopf's default registry with settings
from the environment; scope and liveness then come from kopf's own command-line flags.
`python -m finetune_operator` does the same with the scope taken from FINETUNE_NAMESPACES.
"""

from __future__ import annotations

import kopf

from finetune_operator.handlers import register
from finetune_operator.settings import Settings

runtime = register(kopf.get_default_registry(), Settings.from_env())
