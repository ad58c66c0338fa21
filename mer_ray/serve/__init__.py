"""mer_ray.serve"""
