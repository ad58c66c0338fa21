"""mer_ray.eval"""
