"""mer_ray.bench"""
