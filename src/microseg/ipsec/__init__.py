"""IPsec ESP tunnel mode (AES-GCM): SAD/SPD, encap/decap, anti-replay."""
