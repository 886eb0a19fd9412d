"""Sources and sinks: pcap/pcapng capture files, traffic generation."""
