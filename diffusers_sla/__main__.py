# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
import sys

from .cli import main

sys.exit(main())
