"""IPsec ESP tunnel mode (AES-GCM): SAD/SPD, encap/decap, anti-replay.

``EspGateway(load_config(path))`` holds the SAs' state; ``encrypt_batch`` and ``decrypt_batch``
are the pipeline stages. See :mod:`microseg.ipsec.esp` for the kernels.
"""
from .esp import REASONS
from .gateway import EspGateway, decrypt_batch, encrypt_batch
from .sa import SAConfig, SecurityAssociation, load_config, parse_config

__all__ = ["EspGateway", "encrypt_batch", "decrypt_batch", "load_config", "parse_config",
           "SAConfig", "SecurityAssociation", "REASONS"]
