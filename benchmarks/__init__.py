# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The benchmark suite, run from the repository root as `python -m benchmarks.<name>` (kernel, e2e_wan,
e2e_parallel, quality, diffusers_suite, protect_text_flux, render_results); probes and one-off experiments are in
`benchmarks.lab`. Not part of the installed package: it lives in the repository only."""
