# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The SLA kernels, one file per thing they compute: `common` (feature maps, shared helpers), `selection` (pooling and
top-k), `linear_state` (the linear branch's state), `triton_fwd` / `triton_bwd` (portable attention), `gluon_fwd` /
`gluon_bwd` (Hopper attention). Their launches live one level up (`ops/forward.py`, `ops/backward.py`, ...)."""
