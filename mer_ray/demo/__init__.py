"""The generated corpus and media, and the ``make demo`` run. A leaf: only the root CLI, benchmarks and tests import it."""
