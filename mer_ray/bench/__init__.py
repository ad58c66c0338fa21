"""Every benchmark (``mer bench ...``), each writing JSON. A leaf: only the root CLI imports it."""
