# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""SLA weights: the file format (`format.py`), Hub lookup (`hub.py`), save/load (`io.py`), replay into models loaded
with `from_pretrained` (`replay.py`), the `save_pretrained` wrapper (`save_hook.py`) and converters. Imports `config`,
`ops` and `integration` only."""
