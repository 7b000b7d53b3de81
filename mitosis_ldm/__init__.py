"""mitosis-ldm: the spine shared by every stage.

Typed configuration, accelerate training plumbing, atomic file output, artifact
checks and the `mitosis-ldm` command dispatcher. It imports no stage.
"""

__version__ = "0.1.0"
