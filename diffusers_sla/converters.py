# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The converters' documented path (`read_sla_file`'s error for pickled files names it): they live in
`diffusers_sla.weights.converters`."""

from .weights.converters import (  # noqa: F401
    LEGACY_CONFIG_DEFAULTS,
    ConversionResult,
    convert_simpletuner_sla,
    convert_turbodiffusion_wan,
)
