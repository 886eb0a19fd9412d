"""Policy as data: tenants, workloads, security groups, network policies, compiler."""
