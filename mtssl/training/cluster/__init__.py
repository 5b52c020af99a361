"""Training on a ParameterServerStrategy cluster: the plan (plan.py), the
server and worker processes (worker.py), the coordinator (coordinator.py)."""
