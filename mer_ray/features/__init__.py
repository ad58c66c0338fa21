"""mer_ray.features"""
