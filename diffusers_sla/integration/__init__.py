# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The diffusers glue: routing (`routing.py`), interception (`sdpa.py`, `parallel.py`), `SLAAttnProcessor`
(`processor.py`), installing it (`install.py`), reporting (`report.py`). Imports `config` and `ops` only."""
