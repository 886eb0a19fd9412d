"""Connection tracking with Linux nf_conntrack semantics."""
