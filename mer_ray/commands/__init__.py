"""CLI subcommands, one module per area; each registers on the apps in ``mer_ray.cli``."""
