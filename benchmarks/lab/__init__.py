# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Probes and one-off experiments on the kernels (`python -m benchmarks.lab.<name>` from the repository root): they
explain a number of the suite or check a kernel change, and are not a measurement users are asked to run."""
