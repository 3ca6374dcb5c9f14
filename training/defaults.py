"""The training CLIs' default models: a fresh clone has the deployed versions, so a command given no model uses
them (and says so). CLI behaviour, so it lives here and not in dbp.config (which knows nothing of repositories).
"""
from __future__ import annotations

import sys
from typing import Optional

from dbp import repository
from dbp.config import ConfigError


def deployed_default(value: Optional[str], role: str, flag: str, prog: str) -> str:
    """`value`, or when it is None the weights of the deployed `role` (newest version in model_repository/),
    said on stderr: the training CLIs' default models, which a fresh clone has."""
    if value is not None:
        return value
    try:
        path = str(repository.deployed_weights(role))
    except repository.RepositoryError as e:
        raise ConfigError(f"{flag} not given and {e}") from None
    print(f"{prog}: no {flag} given; using the deployed {role} {path}", file=sys.stderr, flush=True)
    return path
