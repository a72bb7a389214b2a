"""What a sequential run (SASRec, `fedshop/sequential.py`) supports, checked with the config.

Kept apart from `fedshop.sequential` so that validating a config imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedshop.errors import ConfigError

if TYPE_CHECKING:
    from fedshop.config import RunConfig

SEQUENTIAL_METHODS = ("federated", "centralized", "popularity")


def check_sequential_config(config: RunConfig) -> None:
    """Anything a sequential run does not support is a ConfigError naming the setting."""
    name = config.model.name
    if not config.data.dataset.startswith("amazon-"):
        raise ConfigError(
            f'[model] name = "{name}" reads each shopper\'s items in time order: it needs an '
            f"Amazon dataset (amazon-toys, amazon-beauty, amazon-sports, amazon-sequential), "
            f"not {config.data.dataset}"
        )
    if config.data.leave_out != "last":
        raise ConfigError(f'[model] name = "{name}" needs [data] leave_out = "last"')
    if config.eval.protocol != "full":
        raise ConfigError(
            f'[model] name = "{name}" is evaluated by full ranking only; drop --protocol '
            f'{config.eval.protocol} (or set [eval] protocol = "full")'
        )
    if config.privacy.enabled:
        raise ConfigError(f'[model] name = "{name}" does not support differential privacy yet')
    if config.protection.kind != "none":
        raise ConfigError(f'[model] name = "{name}" does not support [protection] yet')
    if config.eval.cold_start:
        raise ConfigError(f'[model] name = "{name}" has no cold-start evaluation')
    others = [m for m in config.methods if m not in SEQUENTIAL_METHODS]
    if others:
        raise ConfigError(
            f'[model] name = "{name}" runs the methods {", ".join(SEQUENTIAL_METHODS)}; '
            f"not {', '.join(others)}"
        )
