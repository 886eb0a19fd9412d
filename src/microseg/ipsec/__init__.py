"""IPsec ESP tunnel mode (AES-GCM): SAD/SPD, encap/decap, anti-replay.

``EspGateway(load_config(path))`` holds the SAs' state; ``encrypt_batch`` and ``decrypt_batch``
are the pipeline stages. See :mod:`microseg.ipsec.esp` for the kernels.
"""

from .esp import REASONS
from .gateway import EspGateway, LifetimeEvent, decrypt_batch, encrypt_batch
from .sa import SAConfig, SecurityAssociation, load_config, parse_config, parse_sa

__all__ = [
    "EspGateway",
    "LifetimeEvent",
    "encrypt_batch",
    "decrypt_batch",
    "load_config",
    "parse_config",
    "parse_sa",
    "SAConfig",
    "SecurityAssociation",
    "REASONS",
]
