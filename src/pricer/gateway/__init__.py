"""ROLE=gateway: the calls to the backend services (DESIGN §1 Roles).

`service.py` calls one backend service (deadline, one retry where it is safe, its circuit breaker, its
metrics); `forward.py` turns an admitted request into such a call and its answer back into the response;
`health.py` is what `/health/detailed` says of each service.
"""
