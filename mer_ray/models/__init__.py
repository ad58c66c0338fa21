"""mer_ray.models"""
