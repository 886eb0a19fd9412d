"""Packets: the batch, header parsing (kernel and reference), building, checksums."""
