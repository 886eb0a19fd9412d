"""L2-L4 rule model, classifier algorithms and the ClassBench loader."""
