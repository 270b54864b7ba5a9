"""Model layer: potentials as pure JAX functions, the ``.mlip`` file format, the ASE calculator.

Importing this package enables 64-bit types in JAX. It must happen before any array is created
(arrays made earlier stay 32-bit) because total energies, edge vectors and the offsets are summed
in float64: a -14 000 eV total in float32 has ~1 meV resolution, above the accuracy we target.
The networks themselves still run in float32 by default, because every layer is created with an
explicit ``dtype`` (``ModelConfig.dtype``), so enabling x64 does not slow them down.
"""

import jax

jax.config.update("jax_enable_x64", True)
